"""The Learner actor: holds the trainable policy and its optimizer, and turns a TrainBatch into one update.

Each step it recomputes the logprobs of the sampled tokens at the rollout temperature, reports how far they are
from the rollout logprobs (mean |Δ logp| and a KL estimate, before any update, i.e. at the weights that
generated the batch when rollouts are synchronous), applies the configured policy loss over micro-batches with
gradient accumulation, clips the gradient norm and steps AdamW. Its version number counts the updates; weights
leave as a state dict tagged with that version.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import transformers

from rl.config import JobConfig
from rl.losses import LOSSES, token_mean
from rl.policy import load_policy
from rl.records import TrainBatch


class Learner:
    def __init__(self, policy_dir: str, cfg: JobConfig) -> None:
        torch.set_num_threads(cfg.trainer.learner_threads)
        transformers.utils.logging.disable_progress_bar()  # one bar per actor per load would drown the job's own
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.model, self.tokenizer = load_policy(policy_dir, cfg.model)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
        self.loss_fn = LOSSES.get(cfg.algorithm.loss)
        self.version = 0

    def get_version(self) -> int:
        return self.version

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def sequence_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logprob of every token given its prefix ([b, t], position 0 is 0) and the entropy there ([b, t])."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # [b, t-1, vocab]
        logp_all = torch.log_softmax(logits / self.cfg.rollout.temperature, dim=-1)
        logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [b, t-1]
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()  # [b, t-1]
        pad = torch.zeros_like(logp[:, :1])
        return torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        cfg = self.cfg
        num_tokens = float(batch.loss_mask.sum().clamp(min=1))
        sums = {"loss": 0.0, "abs_dlogp": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0, "ratio": 0.0}
        for start in range(0, batch.num_sequences, cfg.trainer.micro_batch_size):
            sl = slice(start, start + cfg.trainer.micro_batch_size)
            width = int(batch.attention_mask[sl].sum(1).max())  # trim right padding of this micro-batch
            ids, attn = batch.input_ids[sl, :width], batch.attention_mask[sl, :width]
            mask, old, adv = batch.loss_mask[sl, :width], batch.rollout_logprobs[sl, :width], batch.advantages[sl, :width]
            logp, entropy = self.sequence_logprobs(ids, attn)
            out = self.loss_fn(logp, old, adv, clip_ratio_low=cfg.algorithm.clip_ratio_low, clip_ratio_high=cfg.algorithm.clip_ratio_high)
            loss = token_mean(out.loss, mask, num_tokens)
            loss.backward()
            with torch.no_grad():
                delta = logp.detach() - old
                sums["loss"] += loss.item()
                sums["abs_dlogp"] += token_mean(delta.abs(), mask, num_tokens).item()
                sums["kl"] += token_mean(torch.expm1(delta) - delta, mask, num_tokens).item()  # k3 estimate of KL(rollout || learner)
                sums["clip"] += token_mean(out.clipped.float(), mask, num_tokens).item()
                sums["entropy"] += token_mean(entropy, mask, num_tokens).item()
                sums["ratio"] += token_mean(out.ratio.detach(), mask, num_tokens).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return {
            "loss": sums["loss"],
            "grad_norm": float(grad_norm),
            "mismatch_abs_logp": sums["abs_dlogp"],
            "mismatch_kl": sums["kl"],
            "clip_fraction": sums["clip"],
            "entropy": sums["entropy"],
            "ratio_mean": sums["ratio"],
            "train_tokens": num_tokens,
            "policy_version": float(self.version),
        }

    def save(self, path: str) -> None:
        """Write policy (an HF directory), optimizer and RNG states into `path`."""
        out = Path(path)
        self.model.save_pretrained(out / "policy")
        self.tokenizer.save_pretrained(out / "policy")
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "version": self.version,
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(),
                "python_rng": random.getstate(),
            },
            out / "learner_state.pt",
        )

    def load(self, path: str) -> int:
        """Restore what `save` wrote; returns the policy version."""
        model, _ = load_policy(Path(path) / "policy", self.cfg.model.model_copy(update={"gguf_file": None}))
        self.model.load_state_dict(model.state_dict())
        state: dict[str, Any] = torch.load(Path(path) / "learner_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        return self.version


LearnerActor = ray.remote(Learner)
