"""Load a saved speech LLM the way a user without speechllm_hf would, and compare with expected outputs.

    python load_without_package.py FOLDER EXPECTED.npz

Run in a process where speechllm_hf cannot be imported (a separate virtualenv, or this interpreter with the
import blocked below). Exits non-zero on any difference.
"""

import json
import sys
import tempfile

sys.modules["speechllm_hf"] = None  # any import of the package now raises ImportError

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline  # noqa: E402

folder, expected_path = sys.argv[1], sys.argv[2]
expected = np.load(expected_path)
texts = json.loads(str(expected["texts"]))
clips = [expected[f"clip{i}"] for i in range(int(expected["num_clips"]))]

model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert not type(model).__module__.startswith("speechllm_hf"), type(model).__module__

inputs = processor(texts, audio=clips, sampling_rate=16000)
for name in ("input_ids", "attention_mask", "input_features", "feature_attention_mask"):
    np.testing.assert_array_equal(inputs[name].numpy(), expected[name], err_msg=name)
with torch.no_grad():
    logits = model(**inputs).logits.numpy()
np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)
generated = model.generate(**inputs, max_new_tokens=8, do_sample=False).numpy()
np.testing.assert_array_equal(generated, expected["generated"])

# The pipeline shipped with the model, found through config.json's custom_pipelines (no task name).
pipe = pipeline(model=folder, trust_remote_code=True)
assert type(pipe).__name__ == "SpeechLlmPipeline" and not type(pipe).__module__.startswith("speechllm_hf")
answer = pipe(clips[0], sampling_rate=16000, max_new_tokens=8)
assert answer == {"generated_text": str(expected["pipeline_text"])}, answer

# A loaded model saves again, its pipeline included: a re-published folder keeps `pipeline(model=...)` working.
# The Auto classes of transformers' own audio LLMs load it too.
assert type(AutoModelForSpeechSeq2Seq.from_pretrained(folder, trust_remote_code=True)).__name__ == type(model).__name__

with tempfile.TemporaryDirectory() as resaved:
    model.save_pretrained(resaved)
    with open(f"{resaved}/config.json") as file:
        assert "custom_pipelines" in json.load(file), "the re-saved config.json lost its pipeline entry"
    processor.save_pretrained(resaved)
    again = AutoModel.from_pretrained(resaved, trust_remote_code=True).eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(**inputs).logits.numpy(), expected["logits"], rtol=1e-5, atol=1e-5)
    repipe = pipeline(model=resaved, trust_remote_code=True)
    assert repipe(clips[0], sampling_rate=16000, max_new_tokens=8) == answer

# The attention implementation and dtype asked of AutoModel reach both backbones and the projector.
bf16 = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager", dtype=torch.bfloat16)
report = {
    "transformers": transformers.__version__,
    "model_class": type(model).__module__,
    "attn_implementation": [bf16.encoder.config._attn_implementation, bf16.language_model.config._attn_implementation],
    "dtypes": sorted({str(parameter.dtype) for parameter in bf16.parameters()}),
}
print(json.dumps(report))
