"""Check that a saved speech LLM, loaded the way a user without speechllm_hf loads it, takes a packed batch.

    python padding_free_without_package.py FOLDER PADDED.npz PACKED.npz

PADDED and PACKED are the same rows collated without and with `padding_free` (values that are not tensors, such as
the packed batch's `use_cache=False`, stored as 0-d arrays). For eager and sdpa attention, the packed forward/backward
must give the padded batch's loss, projector gradients and logits. Exits non-zero on any difference; prints a JSON
report last.
"""

import json
import sys

sys.modules["speechllm_hf"] = None  # any import of the package now raises ImportError

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel  # noqa: E402


def load_batch(path: str) -> dict:
    arrays = np.load(path)
    return {name: array.item() if array.ndim == 0 else torch.from_numpy(array) for name, array in arrays.items()}


folder, padded, packed = sys.argv[1], load_batch(sys.argv[2]), load_batch(sys.argv[3])
valid = padded["attention_mask"].bool()
checked = []
for attn_implementation in ("eager", "sdpa"):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation=attn_implementation)
    assert not type(model).__module__.startswith("speechllm_hf"), type(model).__module__
    assert model.language_model.config._attn_implementation == attn_implementation
    model.train()
    results = []
    shapes = []  # the (batch, length) of the LLM's inputs_embeds: (1, N) when packed

    def record(module, args, kwargs, shapes=shapes):
        shapes.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    for batch in (padded, packed):
        model.zero_grad()
        outputs = model(**batch)
        outputs.loss.backward()
        gradients = torch.cat([parameter.grad.flatten() for parameter in model.projector.parameters()])
        results.append((outputs.loss.detach(), gradients, outputs.logits.detach()))
    (padded_loss, padded_gradients, padded_logits), (loss, gradients, logits) = results
    assert shapes == [tuple(valid.shape), (1, int(valid.sum()))], shapes  # the second forward ran packed
    torch.testing.assert_close(loss, padded_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gradients, padded_gradients, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits[0], padded_logits[valid], atol=1e-5, rtol=1e-5)
    checked.append(attn_implementation)
print(json.dumps({"transformers": transformers.__version__, "checked": checked}))
