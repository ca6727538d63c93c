"""SpeechLlmForConditionalGeneration on tiny configs: every encoder x projector, gradients, padding, generation."""

import pytest
import torch
from conftest import ENCODERS, PROJECTORS, clip, tiny

from speechllm_hf import SpeechLlmConfig, SpeechLlmForConditionalGeneration, from_preset


def batch(processor, seconds=(1.0, 0.55), texts=None):
    clips = [clip(s, seed=i) for i, s in enumerate(seconds)]
    texts = texts or [f"<|user|><audio> say {i}<|end|><|assistant|>hello {i}" for i in range(len(clips))]
    return processor(texts, audio=clips, sampling_rate=16000)


class SpeechLlmModelTester:
    """Builds the tiny model of one encoder x projector and its inputs, and checks what every combination must do,
    as transformers' `*ModelTester` classes do for their model tests."""

    def __init__(self, encoder_type: str, projector_type: str):
        self.encoder_type, self.projector_type = encoder_type, projector_type

    def prepare_model_and_processor(self, seed: int = 0):
        torch.manual_seed(seed)
        return from_preset("tiny", encoder_type=self.encoder_type, projector_type=self.projector_type)

    def prepare_inputs(self, processor, seconds=(1.0, 0.55)):
        return batch(processor, seconds)

    def create_and_check_forward_backward(self, model, inputs):
        model.train()
        out = model(**inputs, labels=inputs["input_ids"])
        assert out.logits.shape[:2] == inputs["input_ids"].shape
        assert torch.isfinite(out.loss)
        out.loss.backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("projector.") for n in trainable)
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == trainable
        assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad and p.dim() > 1)

    def create_and_check_generate(self, model, processor):
        model.eval()
        prompt = processor(
            ["<|user|><audio> hi<|end|><|assistant|>"] * 2, audio=[clip(0.8), clip(0.5, 1)], sampling_rate=16000
        )
        generated = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        length = prompt["input_ids"].shape[1]
        assert generated.shape == (2, length + 4)
        assert torch.equal(generated[:, :length], prompt["input_ids"])

    def create_and_check_padded_batch_matches_alone(self, model, processor):
        seconds = (1.3, 0.41, 0.9)
        texts = ["<|user|><audio> a<|end|>", "<|user|>longer text <audio> b<|end|>", "<|user|><audio><|end|>"]
        batched = processor(texts, audio=[clip(s, i) for i, s in enumerate(seconds)], sampling_rate=16000)
        with torch.no_grad():
            logits = model(**batched).logits
            for i, (text, s) in enumerate(zip(texts, seconds)):
                alone = processor([text], audio=[clip(s, i)], sampling_rate=16000)
                single = model(**alone).logits[0]
                valid = batched["attention_mask"][i].bool()
                torch.testing.assert_close(logits[i][valid], single, atol=2e-5, rtol=1e-4)

    def create_and_check_save_and_reload(self, model, processor, folder):
        model.eval()
        inputs = self.prepare_inputs(processor)
        model.save_pretrained(folder, processor=processor)  # a full save: the tiny backbones have no id
        reloaded = SpeechLlmForConditionalGeneration.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)

    def create_and_check_init_weights(self, model):
        """`_init_weights` is what transformers calls on tensors a checkpoint lacks: the projector's own layers get a
        real initialisation (zeros would leave a projector that passes nothing on)."""
        with torch.no_grad():
            for parameter in model.projector.parameters():
                parameter.zero_()
        model.projector.apply(model._init_weights)
        for name, module in model.projector.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                assert bool((module.weight == 1).all()) and bool((module.bias == 0).all()), name
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                assert float(module.weight.std()) > 0, name
        if self.projector_type == "qformer":
            assert 0.01 < float(model.projector.query.std()) < 0.03


@pytest.mark.parametrize("encoder_type", ENCODERS)
@pytest.mark.parametrize("projector_type", PROJECTORS)
class TestSpeechLlmModel:
    """The checks of `SpeechLlmModelTester` on every encoder x projector."""

    def test_forward_backward_generate(self, encoder_type, projector_type):
        tester = SpeechLlmModelTester(encoder_type, projector_type)
        model, processor = tester.prepare_model_and_processor()
        tester.create_and_check_forward_backward(model, tester.prepare_inputs(processor))
        tester.create_and_check_generate(model, processor)

    def test_padded_batch_matches_alone(self, encoder_type, projector_type):
        tester = SpeechLlmModelTester(encoder_type, projector_type)
        tester.create_and_check_padded_batch_matches_alone(*tiny(encoder_type, projector_type))

    def test_save_and_reload_give_the_same_logits(self, encoder_type, projector_type, tmp_path):
        tester = SpeechLlmModelTester(encoder_type, projector_type)
        tester.create_and_check_save_and_reload(*tester.prepare_model_and_processor(), tmp_path / "model")

    def test_init_weights_initialises_the_projector(self, encoder_type, projector_type):
        tester = SpeechLlmModelTester(encoder_type, projector_type)
        tester.create_and_check_init_weights(tester.prepare_model_and_processor()[0])


def test_group_norm_encoder_padding_is_handled():
    """Base HuBERT/wav2vec2 checkpoints normalise over time: padded clips are encoded one by one."""
    from speechllm_hf.presets import tiny_encoder_config

    model, processor = tiny("hubert", "mlp")
    config = model.config.to_dict()
    encoder = tiny_encoder_config("hubert")
    encoder.feat_extract_norm, encoder.do_stable_layer_norm = "group", False
    config["encoder_config"] = encoder
    torch.manual_seed(0)
    group_model = SpeechLlmForConditionalGeneration(SpeechLlmConfig(**config)).eval()
    clips = [clip(1.0), clip(0.4, 1)]
    batched = processor(["<audio>", "<audio>"], audio=clips, sampling_rate=16000)
    with torch.no_grad():
        embeds, lengths = group_model.get_audio_features(batched["input_features"], batched["feature_attention_mask"])
        alone = processor(["<audio>"], audio=[clips[1]], sampling_rate=16000)
        single, single_len = group_model.get_audio_features(alone["input_features"], alone["feature_attention_mask"])
    assert int(lengths[1]) == int(single_len[0])
    torch.testing.assert_close(embeds[1, : int(lengths[1])], single[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("projector_type", "frames_per_token"),
    [("qformer", 17 / 4), ("cnn", 8), ("mlp", 5)],
)
def test_projector_shapes_and_token_rate(projector_type, frames_per_token):
    model, _ = tiny("hubert", projector_type)
    width = model.config.text_config.hidden_size
    frames = 17 * 8 * 5 * 2  # a multiple of every window / stride
    hidden = torch.randn(2, frames, model.config.encoder_hidden_size)
    lengths = torch.tensor([frames, frames // 2])
    with torch.no_grad():
        out, out_lengths = model.projector(hidden, lengths)
    assert out.shape == (2, int(frames / frames_per_token), width)
    assert out_lengths.tolist() == [int(frames / frames_per_token), int(frames / 2 / frames_per_token)]


def test_qformer_window_of_17_frames_gives_4_tokens():
    model, _ = tiny("hubert", "qformer")
    with torch.no_grad():
        out, lengths = model.projector(torch.randn(1, 18, model.config.encoder_hidden_size), torch.tensor([18]))
    assert out.shape[1] == 8 and lengths.item() == 8  # 18 frames -> 2 windows -> 2 x 4 queries


def test_audio_token_count_mismatch_names_both_counts():
    model, processor = tiny()
    inputs = batch(processor, seconds=(1.0,), texts=["<audio> hi"])
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == model.config.audio_token_id).nonzero()[0]] = processor.tokenizer.convert_tokens_to_ids("a")
    with pytest.raises(ValueError, match=r"(\d+) audio tokens .* (\d+) features"):
        model(
            input_ids=ids,
            input_features=inputs["input_features"],
            feature_attention_mask=inputs["feature_attention_mask"],
        )


def test_audio_tokens_without_audio_are_refused():
    model, processor = tiny()
    inputs = batch(processor, seconds=(1.0,), texts=["<audio> hi"])
    num_audio_tokens = int((inputs["input_ids"] == model.config.audio_token_id).sum())
    with pytest.raises(ValueError, match=rf"input_ids hold {num_audio_tokens} audio tokens .* no audio was given"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_config_without_audio_token_id_runs_text_and_explains_audio():
    model, processor = tiny()
    config = SpeechLlmConfig(**{**model.config.to_dict(), "audio_token_id": None})
    torch.manual_seed(0)
    bare = SpeechLlmForConditionalGeneration(config).eval()
    text = processor(["just text"])
    with torch.no_grad():
        assert torch.isfinite(bare(**text, labels=text["input_ids"]).loss)
        with pytest.raises(ValueError, match="config.audio_token_id is not set"):
            bare(**batch(processor, seconds=(1.0,), texts=["<audio> hi"]))


def test_text_only_input():
    model, processor = tiny()
    inputs = processor(["just text", "more text here"])
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2


def test_labels_at_audio_positions_are_ignored():
    model, processor = tiny()
    inputs = batch(processor, seconds=(0.6,), texts=["<audio>abc"])
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        audio = inputs["input_ids"] == model.config.audio_token_id
        expected = model(**inputs, labels=labels.masked_fill(audio, -100)).loss
    torch.testing.assert_close(loss, expected)


def test_logits_to_keep_with_labels_takes_the_loss_on_the_kept_positions():
    model, processor = tiny()
    inputs = batch(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :-3] = -100  # labels on the last 3 positions: predicted by the 4 positions before them
    with torch.no_grad():
        full = model(**inputs, labels=labels)
        kept = model(**inputs, labels=labels, logits_to_keep=4)
    assert kept.logits.shape[1] == 4
    torch.testing.assert_close(kept.logits, full.logits[:, -4:])
    torch.testing.assert_close(kept.loss, full.loss)
    with pytest.raises(ValueError, match="leaves out the logits of labelled positions"):
        model(**inputs, labels=labels, logits_to_keep=3)
    with pytest.raises(ValueError, match="logits_to_keep must be an int"):
        model(**inputs, labels=labels, logits_to_keep=torch.arange(4))


def test_left_padding_does_not_shift_positions():
    """Position ids come from the attention mask, so a left-padded prompt sees the positions it sees alone."""
    model, processor = tiny()
    texts = ["<|user|><audio> short<|end|><|assistant|>", "<|user|><audio> a much longer prompt<|end|><|assistant|>"]
    clips = [clip(0.7), clip(0.9, 1)]
    both = processor(texts, audio=clips, sampling_rate=16000)
    assert processor.tokenizer.padding_side == "left"
    with torch.no_grad():
        last = model(**both).logits[:, -1]
        for i in range(2):
            alone = processor([texts[i]], audio=[clips[i]], sampling_rate=16000)
            torch.testing.assert_close(last[i], model(**alone).logits[0, -1], atol=2e-5, rtol=1e-4)


def test_batched_greedy_generation_equals_one_at_a_time():
    model, processor = tiny()
    texts = ["<|user|><audio> one<|end|><|assistant|>", "<|user|><audio> two two<|end|><|assistant|>"]
    clips = [clip(0.6), clip(1.1, 1)]
    both = processor(texts, audio=clips, sampling_rate=16000)
    out = model.generate(**both, max_new_tokens=6, do_sample=False)
    new = out[:, both["input_ids"].shape[1] :]
    for i in range(2):
        alone = processor([texts[i]], audio=[clips[i]], sampling_rate=16000)
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone["input_ids"].shape[1] :]
        assert new[i, : len(single)].tolist() == single.tolist()


def test_audio_encoded_once_during_generate(monkeypatch):
    model, processor = tiny()
    calls = []
    original = model.get_audio_features
    monkeypatch.setattr(model, "get_audio_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    inputs = batch(processor, seconds=(0.6, 0.9), texts=["<audio> x", "<audio> y"])
    model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(calls) == 1


def test_frozen_parts_stay_in_eval_mode_and_encoder_runs_without_grad():
    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    model.train()
    assert model.projector.training
    assert not model.encoder.training and not model.language_model.training
    inputs = batch(processor)
    hidden, _ = model.encode_audio(inputs["input_features"], inputs["feature_attention_mask"])
    embeds, _ = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    assert embeds.requires_grad and not hidden.requires_grad


def test_gradient_checkpointing_recomputes_the_frozen_llm_without_dropout():
    """`model.train()` alone must make checkpointing act in the frozen LLM (each layer runs again in backward) while
    its dropout stays off (the gradients equal those of a run without checkpointing)."""
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")  # a projector without dropout
    layers = model.language_model.get_decoder().layers
    for layer in layers:  # would change the gradients if the frozen LLM's attention ran in training mode
        layer.self_attn.attention_dropout = 0.5
    layer_calls = []
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    inputs = batch(processor)

    def train_step():
        layer_calls.clear()
        model.zero_grad()
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return len(layer_calls), {n: p.grad.clone() for n, p in model.projector.named_parameters()}

    plain_calls, reference = train_step()
    # transformers 5.x renamed gradient_checkpointing_enable; both versions must work with their own default.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    checkpointed_calls, grads = train_step()
    assert plain_calls == len(layers)
    assert checkpointed_calls == 2 * len(layers)  # every layer recomputed once during backward
    assert not any(layer.self_attn.training or layer.mlp.training for layer in layers)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-5)

    model.eval()
    assert not any(module.training for module in model.modules())


def test_sdpa_and_eager_give_the_same_logits():
    torch.manual_seed(0)
    eager, processor = from_preset("tiny", attn_implementation="eager")
    torch.manual_seed(0)
    sdpa, _ = from_preset("tiny", attn_implementation="sdpa")
    for model, implementation in ((eager, "eager"), (sdpa, "sdpa")):
        assert model.language_model.config._attn_implementation == implementation
        assert model.encoder.config._attn_implementation == implementation
    inputs = batch(processor)
    valid = inputs["attention_mask"].bool()  # a fully masked (left-padding) query row is undefined in either one
    with torch.no_grad():
        eager_logits, sdpa_logits = eager.eval()(**inputs).logits, sdpa.eval()(**inputs).logits
    torch.testing.assert_close(eager_logits[valid], sdpa_logits[valid], atol=1e-5, rtol=1e-4)


def test_bfloat16_is_honoured_by_from_preset_and_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    inputs = batch(processor)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()

    from_preset("tiny")[0].save_pretrained(tmp_path)  # float32 weights
    loaded = SpeechLlmForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}


def test_quantization_goes_to_the_llm_only_and_whisper_stays_off_flash_attention(local_backbones, monkeypatch):
    """Flash attention and quantisation need a GPU; what each backbone's from_pretrained is asked is checked here."""
    from speechllm_hf.models.speechllm import loading_speechllm

    class Stop(Exception):
        pass

    asked = {}

    def record(loader, name_or_path, what, **kwargs):
        asked[what] = kwargs
        if what == "text model":
            raise Stop
        return loader(name_or_path, **kwargs)

    monkeypatch.setattr(loading_speechllm, "from_pretrained_or_explain", record)
    config = tiny("whisper", "cnn")[0].config.to_dict()
    config.update(
        encoder_name_or_path=str(local_backbones / "whisper"), text_name_or_path=str(local_backbones / "llm")
    )
    quantization = object()
    with pytest.raises(Stop):
        SpeechLlmForConditionalGeneration.from_backbones(
            SpeechLlmConfig(**config), quantization_config=quantization, attn_implementation="flash_attention_2"
        )
    assert "quantization_config" not in asked["encoder"] and asked["encoder"]["attn_implementation"] == "sdpa"
    assert asked["text model"]["quantization_config"] is quantization
    assert asked["text model"]["attn_implementation"] == "flash_attention_2"
