"""Everything a job config refers to, checked before Ray, torch or the warm start: `tiderl train`, `tiderl config`
and `tiderl submit` run `preflight` right after the config validates, so a mistake fails in a second or two with a
message naming the key, the value and what to do, instead of a traceback from an actor 20 seconds in.

`rl.config.load_config` checks the YAML itself (keys, types, ranges, rules between settings). Preflight checks what
the YAML points at, and what no single section can see:

- names: the environment, reward functions, advantage estimator, loss and task are built in (known without
  importing them), registered, an entry point, or a `path/to/file.py:name` reference;
- plugin files: the file exists and imports, defines the name, and its signature takes the call tiderl makes;
- model paths (`model.path`, `reward.models[].path`): a directory here whose config transformers loads;
- data files (`data.train_files`, `data.eval_files`, `algorithm.ptx_files`): exist, with the columns of verl's
  layout (`prompt`, `reward_model.ground_truth`) or of PTX examples (`messages` or `text`);
- resources: each actor's bundle fits some node, and all of them the machine or cluster (`rl.launch.placement`);
- algorithm preconditions: a group baseline needs 2+ samples per prompt, token budgets must fit
  `rollout.max_tokens_per_sample` (and it the model's positions), a setting of another variant is not set;
  sharded learners (`trainer.sharding: fsdp`) train neither LoRA nor Muon, nor replay routing.

`tiderl submit` adds what only the cluster can say (`rl.launch.jobs`: its nodes, its interpreter). What can only
fail later (a node dying) fails as before, clearly, at run time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from envs.agent import is_agent_function
from envs.registry import BUILT_IN_ENVS, ENVS, Registry, RegistryError
from rewards.registry import BUILT_IN_REWARDS, REWARDS
from rl.config import ConfigError, JobConfig
from rl.tasks.registry import BUILT_IN as BUILT_IN_TASKS
from rl.tasks.registry import TASKS
from rl.trainer.config import _BUILTIN_ADVANTAGES as BUILTIN_ADVANTAGES
from rl.trainer.config import _BUILTIN_LOSSES as BUILTIN_LOSSES

GROUP_BASELINE_ADVANTAGES = {"grpo", "rloo", "mean_baseline", "reinforce_pp_baseline"}
"""Built-in estimators that compare a sample with the other samples of its prompt (rl/trainer/advantages.py): with
one sample per prompt every advantage is 0."""

# The calls tiderl makes of a user's advantage estimator (rl/loop/controller.py: advantage_batch) and policy loss
# (rl/trainer/learner.py): positional arguments, then keywords.
ADVANTAGE_CALL = (("rewards", "group_ids"), {"normalize_by_std": True, "lengths": None})
LOSS_CALL = (
    ("logprobs", "old_logprobs", "advantages", "mask"),
    {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "k2_tau": 0.1},
)


@dataclass(frozen=True)
class Problem:
    """One thing the config refers to that cannot work, and what to do about it."""

    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.key} = {_show(self.value)}: {self.message}"


class PreflightError(ConfigError):
    """The config refers to things that cannot work; the message lists each with its key, value and fix."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(
            f"the job cannot start ({len(problems)} problem{'s' * (len(problems) > 1)}; nothing was started):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def preflight(
    cfg: JobConfig, *, nodes: list[dict[str, float]] | None = None, local_model: bool = True, resources: bool = True
) -> None:
    """Raise PreflightError listing every problem found.

    `nodes`: the resources of each node the job may use (None: this machine, for a local Ray instance; a job that
    joins a running cluster by address is checked when it places its actors); `resources=False` leaves them out
    (`tiderl submit` checks them against the cluster once it has reached it). `local_model=False`: a model path
    missing here may be a path on the cluster (`tiderl submit`)."""
    from rl.launch.preflight_io import check_data, check_models, check_resources

    problems = [
        *check_references(cfg),
        *check_models(cfg, local_model),
        *check_data(cfg),
        *(check_resources(cfg, nodes) if resources else []),
        *check_algorithm(cfg),
    ]
    if problems:
        raise PreflightError(problems)


# ------------------------------------------------------------------------------------------ names and plugin files


def check_references(cfg: JobConfig) -> list[Problem]:
    """Every registered name in the config, and the signature of every plugin it loads from a file."""
    problems: list[Problem] = []
    env = _resolve(problems, "env.name", cfg.env.name, ENVS, set(BUILT_IN_ENVS), "tiderl.envs")
    if env is not None:
        problems += _env_signature(cfg, env)
    if not cfg.reward.functions and not is_agent_function(env):
        problems.append(
            Problem(
                "reward.functions",
                [],
                "nothing would score the samples: name at least one reward function (the task's verifier first); "
                "only an agent function's own reward (env.name=agent.py:run) stands without one",
            )
        )
    for i, f in enumerate(cfg.reward.functions):
        fn = _resolve(problems, f"reward.functions[{i}].name", f.name, REWARDS, set(BUILT_IN_REWARDS), "tiderl.rewards")
        if fn is not None:
            problems += _reward_signature(f"reward.functions[{i}].name", f.name, fn, f.kwargs)
    algo = cfg.algorithm
    for key, kind, ref, builtins, group, call in (
        (
            "algorithm.advantage",
            "advantage estimator",
            algo.advantage,
            BUILTIN_ADVANTAGES,
            "tiderl.advantages",
            ADVANTAGE_CALL,
        ),
        ("algorithm.loss", "policy loss", algo.loss, BUILTIN_LOSSES, "tiderl.losses", LOSS_CALL),
    ):
        fn = _resolve(problems, key, ref, Registry(kind, group), builtins, group)
        if fn is not None:
            problems += _call_fits(key, ref, fn, *call)
    if cfg.data.task is not None and _is_file_ref(cfg.data.task):
        task = _resolve(problems, "data.task", cfg.data.task, TASKS, set(BUILT_IN_TASKS), "tiderl.tasks")
        from rl.tasks.registry import Task

        if task is not None and not isinstance(task, Task):
            problems.append(
                Problem(
                    "data.task",
                    cfg.data.task,
                    f"is a {type(task).__name__}, not an rl.tasks.Task: build it with "
                    "Task(name, make_rows, env, reward) (rl/tasks/registry.py)",
                )
            )
    return problems


def _resolve(
    problems: list[Problem], key: str, ref: str, registry: Registry, builtins: set[str], group: str
) -> Any | None:
    """The object a file reference or an entry point names, loaded (None for a built-in or registered name, which
    needs no check, and for a problem, which is appended)."""
    if _is_file_ref(ref):
        path = Path(ref.rsplit(":", 1)[0]).expanduser()
        if not path.is_file():
            problems.append(
                Problem(
                    key,
                    ref,
                    f"file {path.resolve()} does not exist: give a path to a .py file, "
                    "relative to the directory you run tiderl from, then ':' and the name in it",
                )
            )
            return None
        try:
            return registry.get(ref)
        except RegistryError as e:
            problems.append(Problem(key, ref, f"{e}: define it there, or fix the name after ':'"))
        except Exception as e:  # the user's module raised on import: say where, without a traceback
            problems.append(Problem(key, ref, f"importing {path} failed: {_where(e, path)}; fix the file"))
        return None
    if ref in builtins:
        return None
    for ep in importlib.metadata.entry_points(group=group):  # a package's: it must load
        if ep.name == ref:
            try:
                return ep.load()
            except Exception as e:
                problems.append(
                    Problem(key, ref, f"entry point {ep.value} (group {group}) failed to load: {_where(e)}")
                )
                return None
    if ref in registry.names():  # registered by code already imported
        return None
    import difflib

    known = sorted(builtins | set(registry.names()))
    close = difflib.get_close_matches(ref, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    problems.append(
        Problem(
            key,
            ref,
            f"unknown {registry.kind}; {hint}known: {', '.join(known)}. Add your own with a "
            f"'path/to/file.py:name' reference or an entry point in group {group!r}",
        )
    )
    return None


def _env_signature(cfg: JobConfig, cls: Any) -> list[Problem]:
    name = cfg.env.name
    if is_agent_function(cls) or inspect.isfunction(cls):  # a plain function can only be meant as an agent
        from rl.launch.preflight_agents import agent_checks

        return agent_checks(cfg, cls)
    missing = [m for m in ("reset", "step", "close") if not callable(getattr(cls, m, None))]
    if missing:
        return [
            Problem(
                "env.name",
                name,
                f"lacks {', '.join(missing)}: an environment has async reset(row), "
                "step(calls) and close() (envs/base.py; ToolEnv gives all three)",
            )
        ]
    if hasattr(cls, "from_config"):
        return []
    try:
        inspect.signature(cls).bind(**cfg.env.kwargs)
    except TypeError as e:
        return [
            Problem(
                "env.kwargs",
                cfg.env.kwargs,
                f"{name} is built as {_name(cls)}(**env.kwargs), which does "
                f"not take them: {e}; its parameters are {_params(cls)}",
            )
        ]
    except ValueError:  # no signature to read (a builtin): tried at run time
        pass
    return []


def _reward_signature(key: str, name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> list[Problem]:
    from rewards.api import RewardSignatureError, detect_style

    try:
        style = detect_style(name, fn)
    except RewardSignatureError as e:
        return [Problem(key, name, str(e))]
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    if style == "trl":
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return [
                Problem(
                    key,
                    name,
                    f"takes ({', '.join(params)}) without **kwargs, but a TRL-style reward receives "
                    "the dataset's columns as keyword arguments too: add **kwargs",
                )
            ]
        return []
    return _call_fits(key, name, fn, ("data_source", "solution_str", "ground_truth", "extra_info"), kwargs)


def _call_fits(key: str, ref: str, fn: Any, positional: tuple[str, ...], keywords: dict[str, Any]) -> list[Problem]:
    """Whether `fn(*positional, **keywords)`, the call tiderl makes, binds to its signature."""
    if not callable(fn):
        return [Problem(key, ref, f"is a {type(fn).__name__}, not a function")]
    try:
        inspect.signature(fn).bind(*positional, **keywords)
    except TypeError as e:
        call = ", ".join([*positional, *(f"{k}=..." for k in keywords)])
        return [Problem(key, ref, f"takes {_params(fn)}, but tiderl calls it as {_name(fn)}({call}): {e}")]
    except ValueError:
        pass
    return []


# ------------------------------------------------------------------------------------------ algorithm


def check_algorithm(cfg: JobConfig) -> list[Problem]:
    """Preconditions of the algorithm the settings choose, and settings that only another variant reads."""
    problems: list[Problem] = []
    r, algo = cfg.rollout, cfg.algorithm
    if r.samples_per_prompt < 2 and algo.advantage in GROUP_BASELINE_ADVANTAGES:
        problems.append(
            Problem(
                "rollout.samples_per_prompt",
                r.samples_per_prompt,
                f"algorithm.advantage="
                f"{algo.advantage} compares each sample with the other samples of its prompt, so with "
                "one sample per prompt every advantage is 0 and nothing trains: set it to 2 or more "
                "(8 by default), or use algorithm.advantage=reinforce_pp (a batch baseline)",
            )
        )
    if r.samples_per_prompt < 2 and algo.dynamic_sampling:
        problems.append(
            Problem(
                "rollout.samples_per_prompt",
                r.samples_per_prompt,
                "algorithm.dynamic_sampling drops "
                "groups whose rewards are all equal, which every group of one sample is: set it to 2 "
                "or more, or dynamic_sampling=false",
            )
        )
    cap = r.max_tokens_per_sample
    budgets = [("rollout.max_new_tokens_per_turn", r.max_new_tokens_per_turn)]
    budgets += [(f"rollout.token_budgets.{k}", v) for k, v in r.token_budgets.items()]
    if r.partial_rollout_budget:
        budgets.append(("rollout.partial_rollout_budget", r.partial_rollout_budget))
    for key, value in budgets:
        if value >= cap:
            problems.append(
                Problem(
                    key,
                    value,
                    f"a sample holds at most rollout.max_tokens_per_sample = {cap} tokens, "
                    "its prompt included, so this budget is never reached: lower it below that, or "
                    "raise max_tokens_per_sample",
                )
            )
    positions = _model_positions(cfg)
    if positions is not None and cap > positions:
        problems.append(
            Problem(
                "rollout.max_tokens_per_sample",
                cap,
                f"the model has {positions} positions (max_position_embeddings): lower it to at most that",
            )
        )
    problems += _other_variant_settings(cfg)
    problems += _sharding(cfg)
    return problems


def _sharding(cfg: JobConfig) -> list[Problem]:
    """What sharded learners (`trainer.sharding: fsdp`, rl/trainer/sharding.py) do not train."""
    t = cfg.trainer
    if t.sharding != "fsdp":
        return []
    problems = []
    if t.lora is not None:
        problems.append(
            Problem(
                "trainer.sharding",
                t.sharding,
                "trainer.lora trains small adapters on a frozen base that every learner keeps whole, and sharded "
                "learners do not shard that base: use trainer.sharding=replicate with LoRA, or trainer.lora=null "
                "to shard full-parameter training",
            )
        )
    if t.optimizer == "muon":
        problems.append(
            Problem(
                "trainer.sharding",
                t.sharding,
                "trainer.optimizer=muon orthogonalizes each whole weight matrix, and sharded learners hold row "
                "shards of them: use trainer.optimizer=adamw, or trainer.sharding=replicate",
            )
        )
    if cfg.algorithm.routing_replay != "off":
        problems.append(
            Problem(
                "trainer.sharding",
                t.sharding,
                f"algorithm.routing_replay={cfg.algorithm.routing_replay} is not built for sharded learners (their "
                "idle micro-batches carry no rollout routing): use trainer.sharding=replicate, or routing_replay=off",
            )
        )
    return problems


def _model_positions(cfg: JobConfig) -> int | None:
    if cfg.model.path is None:
        return cfg.model.tiny.max_position_embeddings
    config = Path(cfg.model.path).expanduser() / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def _other_variant_settings(cfg: JobConfig) -> list[Problem]:
    """Settings changed from their default that the job would silently ignore (as `AlgorithmConfig` does for the
    algorithm's own): each names what it needs. A default written out (a run's resolved config.yaml) is not one."""
    q, r, m = cfg.quant, cfg.rollout, cfg.model
    rules: list[tuple[BaseModel, str, list[str], str, bool]] = [
        (q, "quant", [k for k in type(q).model_fields if k != "enabled"], "only with quant.enabled=true", q.enabled),
        (q, "quant", ["fake_quant_start_step"], "only with quant.mode=qat", q.mode == "qat"),
        (
            r,
            "rollout",
            ["temperature_decay_steps"],
            "only with rollout.temperature_final set",
            r.temperature_final is not None,
        ),
        (cfg.data, "data", ["success_ema"], "only with data.sampling=prioritized", cfg.data.sampling == "prioritized"),
        (m, "model", ["gguf_file"], "only with model.path (a directory that holds the file)", m.path is not None),
        (cfg.reward, "reward", ["models_async"], "only with reward.models", bool(cfg.reward.models)),
        (cfg.eval, "eval", ["every", "sampled"], "only with eval.enabled=true", cfg.eval.enabled),
    ]
    problems = []
    for section, prefix, keys, needs, applies in rules:
        for key in keys:
            if not applies and _changed(section, key):
                value = getattr(section, key)
                shown = value.model_dump() if isinstance(value, BaseModel) else value
                problems.append(Problem(f"{prefix}.{key}", shown, f"applies {needs}: remove it, or set what it needs"))
    return problems


def _changed(section: BaseModel, key: str) -> bool:
    field = type(section).model_fields[key]
    default = field.get_default(call_default_factory=True)
    value = getattr(section, key)
    if isinstance(value, BaseModel):
        return value.model_dump() != default.model_dump()
    return key in section.model_fields_set and value != default


# ------------------------------------------------------------------------------------------ helpers


def _is_file_ref(ref: str) -> bool:
    return ":" in ref and ref.rsplit(":", 1)[0].endswith(".py")


def _where(e: BaseException, path: Path | None = None) -> str:
    """`Type: message`, with the line of `path` it came from (a traceback's worth, in one line)."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, SyntaxError) and e.lineno:
        return f"{type(e).__name__} at line {e.lineno}: {e.msg}"
    if path is not None:
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path.resolve()]
        if lines:
            return f"{text} (line {lines[-1]})"
    return text


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _params(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(unknown)"


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)
