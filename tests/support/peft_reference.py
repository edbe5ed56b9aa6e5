"""peft itself as the reference for multi-LoRA tests (the inference engine's and the server's): adapters made
and saved by peft on the tiny model (different ranks, target subsets, rsLoRA), and peft's `PeftModel` of each
for greedy tokens and prompt log-probabilities."""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTERS = {  # name -> peft LoraConfig arguments
    "alpha": dict(r=8, lora_alpha=16, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "beta": dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"], use_rslora=True),
    "gamma": dict(r=16, lora_alpha=24, target_modules=["dense", "dense_h_to_4h"]),
}


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def write_peft_adapters(model_dir, out: Path, adapters=ADAPTERS, seed: int = 0) -> dict[str, Path]:
    """Each adapter made and saved by peft on a fresh transformers model of `model_dir`, with random nonzero
    lora_B (peft initialises it to zero) so that it changes what the model computes."""
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i, (name, kw) in enumerate(adapters.items()):
        torch.manual_seed(seed + i)  # peft draws lora_A from the global generator: the same adapters every run
        peft_model = get_peft_model(hf_model(model_dir), LoraConfig(task_type="CAUSAL_LM", **kw))
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        dirs[name] = out / name
        peft_model.save_pretrained(dirs[name])
    return dirs


class PeftReference:
    """peft's PeftModel of each adapter (None: the plain transformers model): greedy tokens, prompt logprobs."""

    def __init__(self, model_dir, dirs: dict[str, Path]):
        from peft import PeftModel

        self.models = {None: hf_model(model_dir)}
        self._greedy: dict[tuple, list[int]] = {}
        for name, d in dirs.items():
            self.models[name] = PeftModel.from_pretrained(hf_model(model_dir), d).eval()

    @torch.no_grad()
    def greedy(self, name, prompt: list[int], n: int) -> list[int]:
        key = (name, tuple(prompt), n)
        if key not in self._greedy:  # a plain argmax loop: generate() would never pick the end-of-text token
            ids = torch.tensor([prompt])
            for _ in range(n):
                nxt = self.models[name](input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            self._greedy[key] = ids[0, len(prompt) :].tolist()
        return self._greedy[key]

    @torch.no_grad()
    def prompt_logprobs(self, name, prompt: list[int]) -> list[float]:
        logits = self.models[name](input_ids=torch.tensor([prompt])).logits[0].float()
        return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
