"""A Gradio chat around a speech LLM: upload or record a clip, ask about it, read the answer as it streams.

Gradio is the optional `demo` extra (`pip install "speechllm_hf[demo]"`); it is imported only when a demo is built.

Each answer comes from `stream_generate` on the turn's clip and instruction. A text-only turn asks about the last
clip again, so several questions can follow one upload. `stream_generate` takes one clip and one user turn, so earlier
turns are shown in the chat but are not part of the model's prompt.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from speechllm_hf.data.tasks import PromptConfig
from speechllm_hf.inference.generate import default_prompts, stream_generate

if TYPE_CHECKING:
    import gradio as gr


def import_gradio() -> types.ModuleType:
    """The `gradio` module, or an ImportError that says how to install it."""
    # The demo must work offline; usage reporting would call gradio's servers (set before the import reads it).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as err:
        raise ImportError('The demo needs gradio: pip install "speechllm_hf[demo]"') from err
    return gradio


def build_demo(
    model, processor, *, prompts: PromptConfig | None = None, title: str = "speechllm_hf demo", **generate_kwargs
) -> gr.Blocks:
    """Builds the chat UI (not launched).

    Args:
        model: A `SpeechLlmForConditionalGeneration` in eval mode.
        processor: Its `SpeechLlmProcessor`.
        prompts: The prompt file; None uses the packaged defaults.
        title: The page heading.
        **generate_kwargs: Generation settings for `stream_generate` (`max_new_tokens=128`, greedy by default).

    Returns:
        The `gr.Blocks`; call `.launch()` on it.
    """
    gr = import_gradio()
    default_instruction = (prompts or default_prompts()).instructions["asr"]

    def respond(
        audio: str | None, instruction: str, history: list[dict], last_audio: str | None
    ) -> Iterator[tuple[list[dict], str, str | None]]:
        clip = audio or last_audio
        if clip is None:
            raise gr.Error("Upload or record a clip first.")
        instruction = instruction.strip()
        history = list(history)
        if clip != last_audio:  # a new clip gets its own player in the chat
            # A file, not a gr.Audio: gradio would decode a component's clip (ffmpeg) each time the chat is an input.
            history.append({"role": "user", "content": {"path": clip}})
        history.append({"role": "user", "content": instruction or default_instruction})
        history.append({"role": "assistant", "content": ""})
        yield history, "", clip
        answer = ""
        try:
            for piece in stream_generate(
                model, processor, clip, instruction or None, prompts=prompts, **generate_kwargs
            ):
                answer += piece
                history[-1] = {"role": "assistant", "content": answer}
                yield history, "", clip
        except ValueError as err:  # an unusable clip: say why in the chat rather than fail the event
            history[-1] = {"role": "assistant", "content": f"Cannot use {Path(clip).name}: {err}"}
            yield history, "", None

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nUpload or record a clip, then ask about it (empty: `{default_instruction}`).")
        # No share buttons: they publish to Hugging Face, and the demo is meant to stay local.
        chatbot = gr.Chatbot(label="Conversation", buttons=["copy", "copy_all"], elem_id="chat")
        last_audio = gr.State(None)
        with gr.Row():
            audio = gr.Audio(
                sources=["upload", "microphone"], type="filepath", label="Audio", buttons=["download"], elem_id="audio"
            )
            with gr.Column():
                instruction = gr.Textbox(label="Instruction", placeholder=default_instruction, elem_id="instruction")
                send = gr.Button("Send", variant="primary", elem_id="send")
        inputs, outputs = [audio, instruction, chatbot, last_audio], [chatbot, instruction, last_audio]
        send.click(respond, inputs, outputs)
        instruction.submit(respond, inputs, outputs)
        chatbot.clear(lambda: None, None, last_audio)  # a cleared chat shows the current clip again
    return demo


__all__ = ["build_demo", "import_gradio"]
