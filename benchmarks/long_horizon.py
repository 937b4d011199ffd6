"""Long-horizon episodes on the rollout engine: 200+ sequential tool calls with context management (run by hand).

    python benchmarks/long_horizon.py [--episodes 4] [--set env.context.budget_tokens=768 ...]

The policy is the one `tiderl train configs/long_horizon.yaml` starts from (with `--set` overrides): the built-in
tiny policy warm-started on the sequences the task's scripted teacher produces in the same environment under the
same `env.context` policy (so it has seen rewritten contexts: placeholders, dropped steps), built and cached by the
job's own warm start. Then `--episodes` chains of the config's doors run concurrently through the real engine
(continuous batching, prefix reuse) and the agent loop, and it prints: tokens/s (generated, and processed: prefill
+ cache extensions + decode), peak memory (process RSS, the KV cache it allocates), how the sequences grow, and
what the cache slots did: turns continued in their slot from the whole previous context, turns continued after a
rewrite from the common prefix (how much was kept and recomputed), and fresh prefills (a slot reset). It also
checks that every training sequence holds exactly the tokens the engine saw and sampled. Figures: docs/agentic.md,
"Long horizons".
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from envs.registry import make_env
from rl.config import load_config
from rl.loop.data import to_prompt_row
from rl.policy.warmstart import prepare_policy
from rl.tasks.long_horizon import make_rows
from rollouts.agent_loop import AgentLoop
from rollouts.decoder import Decoder
from rollouts.engine import Batcher, Engine
from rollouts.model import load_policy
from rollouts.renderer import Renderer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "long_horizon.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides (key=value) of configs/long_horizon.yaml"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling at T=1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG, args.set)
    model, tokenizer = load_policy(prepare_policy(cfg), cfg.model)
    renderer = Renderer(tokenizer)
    rollout = cfg.rollout
    env = cfg.env.model_copy(update={"max_turns": args.hops + 10, "max_tool_calls": args.hops + 10})
    engine = Engine(model, renderer.pad_token_id, renderer.eos_token_id, 0, 16, 256, True)

    fed = {"prefill": 0, "extend": 0, "decode": 0}
    slot_events: list[tuple[str, int, int]] = []  # (kind, positions kept, positions recomputed)
    record: list[tuple[list[int], list[int]]] = []
    prefill, extend, decode = Decoder.prefill, Decoder.extend, Decoder.decode
    reusable, submit = Batcher._reusable, Batcher.submit

    def counting_prefill(self, ids, lengths, slots):
        fed["prefill"] += int(lengths.sum())
        return prefill(self, ids, lengths, slots)

    def counting_extend(self, ids, starts, lengths, rows):
        fed["extend"] += int(lengths.sum())
        return extend(self, ids, starts, lengths, rows)

    def counting_decode(self, tok, positions, span, rows):
        fed["decode"] += int(tok.shape[0])
        return decode(self, tok, positions, span, rows)

    def classify(self, request, taken):
        found = reusable(self, request, taken)
        cached = self.cached[self.session_slot[request.session]] if request.session in self.session_slot else None
        if found is None:
            slot_events.append(("fresh", 0, len(request.prompt)))
        else:
            whole = cached is not None and found[1] >= len(cached) - 1
            slot_events.append(("continued" if whole else "rewritten", found[1], len(request.prompt) - found[1]))
        return found

    def recording_submit(self, request, on_done):
        entry = (list(request.prompt), [])
        record.append(entry)
        submit(self, request, lambda g: (entry[1].extend(g.token_ids), on_done(g)))

    Decoder.prefill, Decoder.extend, Decoder.decode = counting_prefill, counting_extend, counting_decode
    Batcher._reusable, Batcher.submit = classify, recording_submit

    loop = AgentLoop(engine, renderer, lambda: make_env(env), rollout, env)
    rows = [to_prompt_row(i, r) for i, r in enumerate(make_rows(args.episodes, seed=7, split="bench", hops=args.hops))]
    episodes = loop.new_episodes(rows, 1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    loop.run_episodes(episodes, 0, greedy=args.greedy, generator=torch.Generator().manual_seed(0))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trajs = [loop.trajectory(ep) for ep in episodes]

    # faithfulness: every request is a prefix of a sequence of its episode followed by exactly what it sampled
    sequences = [s.token_ids.tolist() for t in trajs for s in t.sequences()]
    by_prefix = 0
    for prompt, sampled in record:
        by_prefix += any(s[: len(prompt) + len(sampled)] == prompt + sampled for s in sequences)
    policy_tokens = sum(t.response_length for t in trajs)
    sampled_tokens = sum(len(s) for _, s in record)

    cache = engine._decoder
    kv_bytes = sum(t.numel() * t.element_size() for a in cache.attn for t in vars(a).values() if torch.is_tensor(t))
    calls = [t.num_tool_calls for t in trajs]
    lengths = [len(s.token_ids) for t in trajs for s in t.sequences()]
    kinds = {k: [e for e in slot_events if e[0] == k] for k in ("continued", "rewritten", "fresh")}
    print(f"episodes {args.episodes} x {args.hops} doors, env.context {env.context.model_dump()}")
    print(
        f"tool calls per episode {calls} (errors {[t.num_tool_errors for t in trajs]}), doors opened "
        f"{[ep.env.opened for ep in episodes]}, status {[t.status.value for t in trajs]}, "
        f"truncation {[t.truncation for t in trajs]}"
    )
    print(
        f"wall {wall:.1f} s, CPU {cpu:.1f} s (this process; on a shared machine CPU time is the figure to trust); "
        f"generated {sampled_tokens} tokens = {sampled_tokens / wall:.0f} tokens/s wall, {sampled_tokens / cpu:.0f} "
        f"per CPU-second; processed {sum(fed.values())} (prefill {fed['prefill']}, extend {fed['extend']}, decode "
        f"{fed['decode']}) = {sum(fed.values()) / cpu:.0f} per CPU-second"
    )
    print(
        f"peak RSS {rss_after:.0f} MiB (before the episodes {rss_before:.0f} MiB); KV cache "
        f"{kv_bytes / 2**20:.2f} MiB ({cache.slots} slots x {cache.max_len} positions)"
    )
    print(
        f"sequences per episode {[len(t.earlier) + 1 for t in trajs]}; sequence length median "
        f"{statistics.median(lengths):.0f}, max {max(lengths)}; longest request prompt {max(len(p) for p, _ in record)}"
    )
    for kind, events in kinds.items():
        if events:
            print(
                f"slot {kind}: {len(events)} turns, kept median {statistics.median(e[1] for e in events):.0f} "
                f"positions, recomputed median {statistics.median(e[2] for e in events):.0f}"
            )
    print(
        f"faithful: {by_prefix}/{len(record)} requests are a sequence's prefix + its sample; policy tokens on the "
        f"loss masks {policy_tokens} = sampled {sampled_tokens}: {policy_tokens == sampled_tokens}"
    )


if __name__ == "__main__":
    main()
