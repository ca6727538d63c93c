"""The "speech-llm" transformers pipeline, registered in-process on import.

The pipeline class lives with the model code (`speechllm_hf.models.speechllm.pipeline_speechllm`), which ships to the
Hub: a saved model's config.json names it under `custom_pipelines`, so `pipeline(model=repo_or_folder,
trust_remote_code=True)` finds it without a task name, with or without speechllm_hf installed. The registration here
serves in-memory models:

```python
import speechllm_hf  # registers the task
from transformers import pipeline

pipe = pipeline("speech-llm", model=model, processor=processor)
pipe("clip.wav")  # {"generated_text": "..."}
```

For large jobs, `speechllm_hf.inference.generate_responses` also sorts clips by duration and reports bad ones instead
of raising, and reads the prompt file the model was trained with (`PromptConfig`); the pipeline takes its
`user_template` and `instruction` as call keywords.
"""

from __future__ import annotations

from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from speechllm_hf.models.speechllm.pipeline_speechllm import PIPELINE_TASK, SpeechLlmPipeline

TASK = PIPELINE_TASK

PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=SpeechLlmPipeline, pt_model=AutoModel, type="multimodal")

__all__ = ["SpeechLlmPipeline", "TASK"]
