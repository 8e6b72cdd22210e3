"""Every argument of every `brep-rl` verb, as dataclasses parsed by TRL's TrlParser (a YAML `--config` plus
command-line overrides; each flag spelled with underscores or dashes alike).

A value is checked while parsing, before any model loads: choices are Literal types (argparse names the flag, the
value and the choices), everything else is checked in `__post_init__`, naming the flag.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import TrainingArguments
from trl import GRPOConfig

from brep_rl.data import DEFAULT_INSTRUCTION, Problem, json_mapping, load_task
from brep_rl.errors import ConfigError, DataError
from brep_rl.steering import SteeringConfig

Mode = Literal["bias", "prefix", "bias+prefix"]
Dtype = Literal["float32", "bfloat16", "float16"]
BackendChoice = Literal["auto", "transformers", "llama.cpp"]
Fallback = Literal["last_number", "none"]

CHAIN_SUM_2X2 = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}'
_LAYERS = re.compile(r"^\s*(all|\d+(-\d*)?(\s*,\s*\d+(-\d*)?)*)\s*$")


def _positive(flag: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"--{flag}: expected a number > 0, got {value!r}")


def _non_negative(flag: str, value: int | float) -> None:
    if isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"--{flag}: expected a number >= 0, got {value!r}")


# ---- model and steering (sft, grpo, lora) -----------------------------------------------------------------------


@dataclass
class ModelArguments:
    model: str = field(default="smollm2-135m", metadata={"help": "alias, .gguf file, HF folder or hub id"})
    dtype: Dtype = field(default="float32", metadata={"help": "base model dtype (the vectors stay fp32)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process (default: cores / local processes)"})

    def __post_init__(self) -> None:
        _positive("threads", self.threads, allow_none=True)


def parse_layers(spec: str | list[int], num_layers: int) -> list[int] | None:
    """'all' -> None (every layer); '1-' -> 1..num_layers-1; '2-5,9' -> [2, 3, 4, 5, 9]; a list passes through."""
    if isinstance(spec, list):
        return spec
    if not _LAYERS.match(spec):
        raise ConfigError(f"--layers: expected 'all' or indices/ranges such as '1-', '2-20', '0,4,8'; got {spec!r}")
    if spec.strip() == "all":
        return None
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, dash, last = part.partition("-")
        stop = (int(last) if last else num_layers - 1) if dash else int(first)
        layers.extend(range(int(first), stop + 1))
    if not layers:
        raise ConfigError(f"--layers: {spec!r} names no layer (the model has {num_layers}: 0..{num_layers - 1})")
    return layers


@dataclass
class SteeringArguments:
    mode: Mode = field(default="bias", metadata={"help": "bias (every position) | prefix (prompt + first answer tokens) | bias+prefix"})
    site: str = field(default="mlp.down_proj", metadata={"help": "submodule of each decoder layer to steer"})
    layers: str = field(default="1-", metadata={"help": "layers to steer: 'all', or indices and ranges such as '1-' "
                        "(1 to the last; the default, which llama.cpp rollouts can apply: they cannot steer layer 0), '2-20', '0,4,8'"})
    prefix_tokens: int = field(default=8, metadata={"help": "answer tokens covered by the prefix vector"})
    radius: float | None = field(default=None, metadata={"help": "L2 bound per layer vector (None: unrestrained)"})
    radius_relative: bool = field(default=False, metadata={"help": "radius as a multiple of the site's median output norm"})
    penalty: float = field(default=0.0, metadata={"help": "weight of an L2 penalty on the vectors"})
    init: Literal["zeros", "normal"] = field(default="zeros", metadata={"help": "initial vectors"})
    init_std: float = field(default=0.01)
    init_from: str | None = field(default=None, metadata={
        "help": "start from a saved artifact (e.g. SFT vectors before GRPO) or a llama.cpp control vector (.gguf)"})

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            self.layers = ",".join(map(str, self.layers))  # a YAML list
        parse_layers(self.layers, num_layers=1_000_000)  # the syntax now; the range once the model is known
        if self.radius is not None:
            _positive("radius", self.radius)
        _non_negative("penalty", self.penalty)
        _non_negative("prefix_tokens", self.prefix_tokens)

    def to_config(self, num_layers: int) -> SteeringConfig:
        return SteeringConfig(
            site=self.site, layers=parse_layers(self.layers, num_layers), mode=self.mode, prefix_tokens=self.prefix_tokens,
            radius=self.radius, radius_relative=self.radius_relative, penalty=self.penalty, init=self.init,
            init_std=self.init_std,
        )


# ---- data ----------------------------------------------------------------------------------------------------------


@dataclass
class TaskArguments:
    """Which problems are read, and how they are put to the model (training stages and the eval harness alike)."""

    task: str = field(default="gsm8k", metadata={"help": "gsm8k | math500 | rg:<reasoning-gym dataset> | path.jsonl"})
    split: str = "train"
    limit: int | None = field(default=2000, metadata={"help": "number of problems"})
    offset: int = 0
    rg_config: str | None = field(default=None, metadata={"help": "reasoning-gym dataset config as JSON (a mapping in YAML)"})
    question: str = field(default="{question}", metadata={"help": "question template over JSONL fields, e.g. '{Body} {Question}'"})
    answer_field: str = "answer"
    skip_invalid: bool = field(default=False, metadata={"help": "skip (and count) invalid JSONL lines instead of stopping"})
    instruction: str | None = field(default=DEFAULT_INSTRUCTION, metadata={"help": "appended to every question ('' for none)"})
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        self.rg_config = _json_flag("rg_config", self.rg_config)
        self.instruction = self.instruction or None
        _positive("limit", self.limit, allow_none=True)
        _non_negative("offset", self.offset)

    def source(self, seed: int | None = None) -> dict:
        """Where the problems come from, as an eval run's run.json records it: the same source, the same problem ids.
        A reasoning-gym task is drawn with a seed: given one, it is part of the source."""
        if not self.task.startswith("rg:"):
            return {"task": self.task, "split": self.split, "rg_config": None}  # GRPO's default rg_config is chain_sum's
        return {"task": self.task, "split": self.split, "rg_config": self.rg_config,
                **({"seed": seed} if seed is not None else {})}

    def provenance(self) -> dict:
        """What a trained artifact records of the problems it learned from (SFT and GRPO alike); with the run's seed
        (a reasoning-gym task's draw) they name the training problems and the validation ones after them."""
        return {**self.source(), "offset": self.offset, "limit": self.limit}

    def load_problems(self, seed: int, solution_field: str | None = None) -> list[Problem]:
        return load_task(
            self.task, self.split, self.limit, self.offset, seed, self.question, self.answer_field, solution_field,
            self.rg_config, self.skip_invalid,
        )


def _json_flag(flag: str, value: Any) -> dict | None:
    try:
        return json_mapping(value)
    except ValueError as e:
        raise ConfigError(f"--{flag}: {e}") from None


@dataclass
class SFTDataArguments(TaskArguments):
    task: str = field(default="gsm8k", metadata={"help": "gsm8k | math500 | rg:<name> | path.jsonl (rows need a worked solution)"})
    solution_field: str | None = None
    solutions: Literal["reference", "self", "scratchpad", "stepwise"] = field(default="reference", metadata={
        "help": "the targets: the task's worked solutions, the model's own correct samples (rejection sampling, "
                "as in STaR / RFT: self_samples per problem from the vectors training starts from), or for sums "
                "(chain_sum) a scratchpad worked one operation a line, signs taken outside; stepwise: the same "
                "with each operation's second number taken one place value at a time (43 - 15 = 43 - 10 - 5 = ...)"})
    self_samples: int = field(default=8, metadata={"help": "solutions self: samples per problem"})
    self_temperature: float = 0.7
    self_max_new_tokens: int = 64
    self_calculator: bool = field(default=False, metadata={
        "help": "solutions self: GSM8K's calculator in the sampling (llama.cpp), as in GRPO's --calculator; the "
                "results it wrote stay in the targets"})
    heldout: int = field(default=32, metadata={"help": "problems kept out of training, from the end of the selection, for held-out loss"})
    truncate_prob: float = field(default=0.9, metadata={"help": "probability that an example keeps loss on the first truncate_tokens only (0: plain SFT)"})
    truncate_tokens: int = field(default=64, metadata={"help": "answer tokens that carry loss in a truncated example"})
    max_length: int = field(default=384, metadata={"help": "prompt + answer tokens; longer answers are cut, longer prompts dropped"})
    eval_task: str = field(default="gsm8k", metadata={"help": "after training: a short base vs steered eval with the harness"})
    eval_split: str = "test"
    eval_limit: int = field(default=20, metadata={"help": "problems in that eval (0: skip it)"})
    eval_max_new_tokens: int = 160
    eval_rg_config: str | None = field(default=None, metadata={"help": "reasoning-gym config of eval_task, JSON"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.truncate_prob <= 1:
            raise ConfigError(f"--truncate_prob: expected a probability in [0, 1], got {self.truncate_prob}")
        _positive("truncate_tokens", self.truncate_tokens)
        _positive("self_samples", self.self_samples)
        _positive("self_temperature", self.self_temperature)
        if self.self_calculator and self.solutions != "self":
            raise ConfigError(f"--self_calculator samples the model's own solutions: it needs --solutions self, "
                              f"got {self.solutions}")
        if self.max_length < 2:
            raise ConfigError(f"--max_length: expected >= 2, got {self.max_length}")
        _non_negative("heldout", self.heldout)
        _non_negative("eval_limit", self.eval_limit)
        self.eval_rg_config = _json_flag("eval_rg_config", self.eval_rg_config)


@dataclass
class GRPODataArguments(TaskArguments):
    task: str = field(default="rg:chain_sum", metadata={"help": "gsm8k | math500 | rg:<name> | path.jsonl"})
    rg_config: str | None = field(default=CHAIN_SUM_2X2, metadata={"help": "reasoning-gym config, JSON"})
    fallback: Fallback = field(default="last_number", metadata={"help": "answer extraction without \\boxed{} or ####"})
    rewards: list[str] = field(default_factory=lambda: ["accuracy"], metadata={
        "help": "reward functions by name (reward/registry.py: accuracy, format) or module:function; weights in --reward_weights"})
    format_reward_weight: float = field(default=0.0, metadata={"help": "shorthand: adds the format reward with this weight"})
    solutions: Literal["reference", "scratchpad", "stepwise"] = field(default="reference", metadata={
        "help": "the worked solutions --demonstrations and --hint_share give: the task's own, or for sums (chain_sum) "
                "the scratchpads of brep-rl sft --solutions scratchpad / stepwise"})
    extra_rewards: str | None = field(default=None, metadata={"help": "shorthand: comma-separated module:function rewards, weight 1 each"})
    allow_reward_imports: bool = field(default=False, metadata={
        "help": "let module:function entries of rewards / extra_rewards import code (off: registered rewards only)"})
    curriculum: str | None = field(default=None, metadata={
        "help": "a reasoning-gym dataset whose curriculum levels replace the training prompts, raised and lowered by "
                "the rolling training accuracy (e.g. chain_sum: more terms, more digits)"})
    curriculum_window: int = field(default=32, metadata={"help": "groups in the rolling accuracy"})
    curriculum_raise: float = field(default=0.7, metadata={"help": "raise the level above this rolling accuracy"})
    curriculum_lower: float = field(default=0.1, metadata={"help": "lower the level below this rolling accuracy"})
    curriculum_start_level: int = 0
    mix: str | None = field(default=None, metadata={
        "help": "other tasks whose train-split problems join the training set, JSON (a mapping in YAML): task -> "
                "{limit, rg_config}; each adds `limit` problems, so the limits weigh the mix"})
    train_on_failures: str | None = field(default=None, metadata={
        "help": "an eval run folder (brep-rl eval --output) on these training problems: train only on those its "
                "steered model got wrong, to spend the rollouts where the starting vectors still fail"})
    failures_of: str | None = field(default=None, metadata={"help": "the model of that run (default: its only steered one)"})
    eval_task: str | None = field(default=None, metadata={"help": "task of the final base vs steered eval (default: the training task)"})
    eval_split: str = "test"
    eval_limit: int = field(default=50, metadata={"help": "problems in the final eval (0: skip it)"})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "default: max_completion_length"})
    eval_rg_config: str | None = field(default=None, metadata={"help": "default: rg_config when eval_task is the training task"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("format_reward_weight", self.format_reward_weight)
        _positive("curriculum_window", self.curriculum_window)
        if not 0 <= self.curriculum_lower < self.curriculum_raise <= 1:
            raise ConfigError(f"--curriculum_lower / --curriculum_raise: expected 0 <= lower < raise <= 1, got "
                              f"{self.curriculum_lower} and {self.curriculum_raise}")
        _non_negative("eval_limit", self.eval_limit)
        _positive("eval_max_new_tokens", self.eval_max_new_tokens, allow_none=True)
        self.eval_rg_config = _json_flag("eval_rg_config", self.eval_rg_config)
        self.mix = _json_flag("mix", self.mix)
        for task, spec in (self.mix or {}).items():
            if not isinstance(spec, dict) or set(spec) - {"limit", "rg_config"} or not isinstance(spec.get("limit"), int) \
                    or isinstance(spec["limit"], bool) or spec["limit"] < 1:
                raise ConfigError(f"--mix: task {task!r}: expected {{\"limit\": <positive int>, \"rg_config\": "
                                  f"<mapping, optional>}}, got {spec!r}")
            spec["rg_config"] = _json_flag(f"mix {task} rg_config", spec.get("rg_config"))
        if self.train_on_failures and (self.mix or self.curriculum):
            raise ConfigError("--train_on_failures selects among --task's problems: it does not combine with --mix or "
                              "--curriculum")
        if self.failures_of and not self.train_on_failures:
            raise ConfigError("--failures_of names a model of the --train_on_failures run: set that too")
        if self.mix and self.curriculum:
            raise ConfigError("--mix with --curriculum: the curriculum draws every training prompt, so the mixed "
                              "tasks would never be trained on")
        if self.solutions != "reference" and self.curriculum:
            raise ConfigError(f"--solutions {self.solutions} with --curriculum: the curriculum's problems keep their own "
                              "solutions; drop one")

    def training_problems(self, seed: int) -> list[Problem]:
        """The task's problems, then each mixed task's (`limit` problems of the same split)."""
        problems = self.load_problems(seed)
        for task, spec in (self.mix or {}).items():
            problems += load_task(task, self.split, spec["limit"], seed=seed, rg_config=spec["rg_config"])
        repeated = [pid for pid, n in Counter(p.id for p in problems).items() if n > 1]
        if repeated:
            raise DataError(f"--mix: problem ids repeat across the mixed tasks (e.g. {repeated[0]!r}); mix tasks other "
                            f"than --task {self.task!r}")
        return problems

    def reward_names(self, weights: list[float] | None) -> tuple[list[str], list[float]]:
        """(names, weights) with the shorthands folded in: --rewards/--reward_weights, then format and extras."""
        names = list(self.rewards)
        weights = list(weights) if weights is not None else [1.0] * len(names)
        if self.format_reward_weight > 0 and "format" not in names:
            names.append("format")
            weights.append(self.format_reward_weight)
        for extra in filter(None, (e.strip() for e in (self.extra_rewards or "").split(","))):
            names.append(extra)
            weights.append(1.0)
        return names, weights


@dataclass
class ValidationArguments:
    """Greedy accuracy (and pass@k of sampled answers) on held-out problems every `validation_steps` optimizer steps
    during training, the best vectors kept in output_dir/best (off while validation_steps is 0)."""

    validation_steps: int = field(default=0, metadata={"help": "validate every N steps (0: never)"})
    validation_task: str | None = field(default=None, metadata={"help": "default: the training task"})
    validation_split: str = field(default="train", metadata={"help": "never the test split: choosing on it biases the test"})
    validation_offset: int | None = field(default=None, metadata={
        "help": "default: right after the training problems (offset + limit of the training task)"})
    validation_limit: int = 100
    validation_rg_config: str | None = field(default=None, metadata={"help": "default: the training task's"})
    validation_max_new_tokens: int | None = field(default=None, metadata={
        "help": "default: a GRPO run's max_completion_length (answers as long as the trained ones), 32 for SFT"})
    validation_samples: int = field(default=0, metadata={
        "help": "also sample k answers per problem at --validation_temperature and log pass@k, the room RL has "
                "(0: greedy only)"})
    validation_temperature: float = 0.7
    validation_pick: Literal["accuracy", "pass@k"] = field(default="accuracy", metadata={
        "help": "what output_dir/best keeps the highest of: greedy accuracy, or pass@k (for an SFT run that starts RL)"})

    def __post_init__(self) -> None:
        _non_negative("validation_steps", self.validation_steps)
        _positive("validation_limit", self.validation_limit)
        _positive("validation_max_new_tokens", self.validation_max_new_tokens, allow_none=True)
        _non_negative("validation_samples", self.validation_samples)
        if self.validation_samples and self.validation_temperature <= 0:
            raise ConfigError(f"--validation_temperature: sampling {self.validation_samples} answers needs a "
                              f"temperature > 0, got {self.validation_temperature}")
        if self.validation_pick == "pass@k" and not self.validation_samples:
            raise ConfigError("--validation_pick pass@k needs --validation_samples k (the answers sampled per problem)")
        self.validation_rg_config = _json_flag("validation_rg_config", self.validation_rg_config)
        if self.validation_split == "test":
            raise ConfigError("--validation_split: choosing checkpoints on the test split biases the test; use train "
                              "(problems after the training ones) or another split")

    def problems(self, data: TaskArguments, seed: int) -> list[Problem]:
        same_task = self.validation_task in (None, data.task)
        offset = self.validation_offset if self.validation_offset is not None else data.offset + (data.limit or 0)
        return load_task(
            data.task if same_task else self.validation_task, self.validation_split, self.validation_limit, offset,
            seed, data.question, data.answer_field,
            rg_config=self.validation_rg_config or (data.rg_config if same_task else None),
        )


# ---- trainer settings --------------------------------------------------------------------------------------------


def fit_to_machine(args: TrainingArguments) -> None:
    """For TrainingArguments subclasses, before their __post_init__: refuse what this machine cannot run, then
    set up multi-process training on CPU."""
    from brep_rl.training import check_machine, configure_cpu_distributed

    check_machine(args)
    configure_cpu_distributed(args)


@dataclass
class SteeringTrainingDefaults:
    """What the SFT and GRPO configs share: defaults for training a few KB of vectors on a CPU (transformers' and
    TRL's suit full fine-tuning on GPUs), and the machine checks before their own __post_init__."""

    weight_decay: float = 0.0
    bf16: bool | None = False
    dataloader_pin_memory: bool = False
    seed: int = 0
    # Same seed, same machine, same thread count: the same vectors. Without it two GRPO runs part at step 2 (a
    # backward op accumulates in a varying order; Adam turns that float noise into full-size updates); no cost here.
    full_determinism: bool = True
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace a previous run in output_dir (its checkpoints, artifact and logs); without it such a folder is refused"})

    def __post_init__(self) -> None:
        fit_to_machine(self)
        super().__post_init__()


@dataclass
class SteeringSFTConfig(SteeringTrainingDefaults, TrainingArguments):
    """TrainingArguments with our defaults (SteeringTrainingDefaults) and SFT's own."""

    output_dir: str = "runs/sft"
    learning_rate: float = 5e-3
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: float = 3
    max_steps: int = 40
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    logging_steps: float = 5
    save_steps: float = 20
    save_total_limit: int | None = 2
    remove_unused_columns: bool = False  # keep response_start for the prefix window


@dataclass
class SteeringGRPOConfig(SteeringTrainingDefaults, GRPOConfig):
    """GRPOConfig with our defaults (SteeringTrainingDefaults), GRPO's own, and dynamic sampling's settings."""

    output_dir: str = "runs/grpo"
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "constant"  # a warmup's first step has lr 0: a twelfth of a 12-step run lost
    max_steps: int = 12
    per_device_train_batch_size: int = 16
    num_generations: int | None = 8
    max_completion_length: int | None = 32
    temperature: float = 0.7
    beta: float = 0.0
    logging_steps: float = 1
    save_steps: float = 4
    save_total_limit: int | None = 2
    activation_checkpointing: bool | None = False  # it re-runs forwards outside the steering hooks
    rollout_backend: BackendChoice = field(default="auto", metadata={"help": "what generates the rollouts (auto: "
                                           "llama.cpp for a GGUF base when llama-cpp-python is installed)"})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "drop groups whose completions all score the same and refill the batch with fresh prompts (DAPO)"})
    max_refills: int = field(default=4, metadata={"help": "dynamic sampling: extra rounds of generation per batch, at most"})
    hint_share: float = field(default=0.0, metadata={
        "help": "dynamic sampling: a group no sample of which is right is generated again with this share of the "
                "reference solution as the start of the answer (Prefix-RFT); 0 = no hints"})
    hint_decay_steps: int | None = field(default=None, metadata={
        "help": "the hint share falls linearly to 0 at this step (default: max_steps)"})
    demonstrations: bool = field(default=False, metadata={
        "help": "dynamic sampling: in a group no sample of which is right, the last sample is replaced by the "
                "reference solution and trained as an off-policy sample (LUFFY, arXiv 2504.14945)"})
    demonstration_groups: Literal["unsolved", "every"] = field(default="unsolved", metadata={
        "help": "the groups --demonstrations guides: unsolved ones, or every group (LUFFY's mix: the reference "
                "beside the policy's samples wherever it is right)"})
    pack_micro_batches: bool = field(default=True, metadata={
        "help": "train a generation batch's rows sorted by completion length, each micro-batch cut to its longest "
                "completion, rows with zero advantage left out (beta 0): the same update for less compute; applied "
                "where it is exact (loss_type dapo or cispo, one optimizer step per generation batch)"})
    calculator: bool = field(default=False, metadata={
        "help": "GSM8K's calculator in the rollouts (llama.cpp): after `expression =` the result is written for the "
                "policy and left out of the loss; validation and the final eval use it too"})
    # TRL's truncated importance sampling (its vLLM correction), applied to llama.cpp rollouts: per-token ratio
    # pi_train / pi_sampler capped at vllm_importance_sampling_clip_max
    vllm_importance_sampling_mode: str = "token_truncate"

    def __post_init__(self) -> None:
        _non_negative("max_refills", self.max_refills)
        if not 0 <= self.hint_share <= 1:
            raise ConfigError(f"--hint_share: expected a share of the solution in [0, 1], got {self.hint_share}")
        if self.hint_share and not self.dynamic_sampling:
            raise ConfigError("--hint_share gives hints to groups dynamic sampling finds unsolved: add --dynamic_sampling true")
        if self.demonstrations and not self.dynamic_sampling:
            raise ConfigError("--demonstrations guide groups dynamic sampling finds unsolved: add --dynamic_sampling true")
        if self.demonstration_groups != "unsolved" and not self.demonstrations:
            raise ConfigError(f"--demonstration_groups {self.demonstration_groups}: add --demonstrations true")
        if self.demonstrations and self.hint_share:
            raise ConfigError("--demonstrations and --hint_share both guide unsolved groups: choose one")
        _positive("hint_decay_steps", self.hint_decay_steps, allow_none=True)
        if self.hint_share and self.hint_decay_steps is None and self.max_steps <= 0:
            raise ConfigError("--hint_share decays to 0 at --hint_decay_steps, which defaults to --max_steps; "
                              "this run counts epochs (max_steps unset): give --hint_decay_steps")
        super().__post_init__()


# ---- eval ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalSettings(TaskArguments):
    """What the eval harness runs: problems (as TaskArguments, from the test split), decoding, answer extraction,
    backend."""

    split: str = "test"
    limit: int | None = field(default=100, metadata={"help": "number of problems"})
    samples: int = field(default=1, metadata={"help": "samples per problem, for pass@k / maj@k"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = field(default=16, metadata={"help": "sequences decoded at once (llama.cpp starts the next problem as soon as one is done)"})
    seed: int = 0
    fallback: Fallback = field(default="last_number", metadata={"help": "answer extraction when there is no \\boxed{} or ####"})
    backend: BackendChoice = field(default="auto", metadata={"help": "what generates: auto picks llama.cpp for a GGUF base "
                                   "when llama-cpp-python is installed and can apply the artifacts"})
    calculator: bool = field(default=False, metadata={"help": "GSM8K's calculator: after `expression =` the result is "
                             "written for the model, for the base and every variant alike (llama.cpp backend)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("samples", self.samples)
        _positive("batch_size", self.batch_size)
        _positive("max_new_tokens", self.max_new_tokens)
        _non_negative("temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p: expected a number in (0, 1], got {self.top_p}")
        if self.samples > 1 and self.temperature <= 0:
            raise ConfigError(f"--samples {self.samples} with --temperature {self.temperature}: greedy decoding gives "
                              "identical samples; set a temperature > 0")


@dataclass
class EvalArguments(EvalSettings):
    """`brep-rl eval`: the base and each steering artifact (and LoRA adapter) on the same problems."""

    model: str = field(default="smollm2-135m", metadata={"help": "alias, .gguf file, HF folder or hub id"})
    steering: list[str] = field(default_factory=list, metadata={
        "help": "steering artifact(s) to compare with the base (repeatable), each labelled by its folder's name or "
                "as LABEL=PATH says", "action": "extend"})
    lora: list[str] = field(default_factory=list, metadata={
        "help": "PEFT LoRA adapter folder(s) (brep-rl lora, lora-sft) to compare on the same problems and backend "
                "(on llama.cpp as a llama.cpp LoRA; repeatable), labelled as --steering ones", "action": "extend"})
    scale: str = field(default="1", metadata={"help": "comma-separated steering strengths, e.g. 0.5,1,2"})
    output: str | None = field(default=None, metadata={"help": "folder for samples.jsonl + summary.json/.md; re-running resumes"})
    layers: list[str] = field(default_factory=list, metadata={
        "help": "apply only these of each artifact's layers (default: all), e.g. 1-15 or 3,7,20; repeat for one "
                "variant per subset (ablation in one run): --layers all --layers 1-15 --layers 16-29", "action": "extend"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: all cores)"})
    dtype: Dtype = "float32"
    device: str = field(default="auto", metadata={
        "help": "where the transformers model runs: auto (the GPU when there is one), cpu, cuda, cuda:1, ..."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scales()
        for spec in self.layers:
            parse_layers(spec, num_layers=1_000_000)  # the syntax now; open ranges once the artifact is known
        _positive("threads", self.threads, allow_none=True)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"--device: expected auto or a torch device such as cpu, cuda, cuda:1; "
                                  f"got {self.device!r}") from None

    def scales(self) -> list[float]:
        try:
            values = [float(s) for s in str(self.scale).split(",") if s.strip()]
        except ValueError:
            values = []
        if not values or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"--scale: expected comma-separated numbers such as 0.5,1,2; got {self.scale!r}")
        return values

    def settings(self) -> EvalSettings:
        names = EvalSettings.__dataclass_fields__
        return EvalSettings(**{k: v for k, v in vars(self).items() if k in names})


# ---- the other verbs -------------------------------------------------------------------------------------------------


@dataclass
class InspectArguments:
    """`brep-rl inspect DIR`: a saved artifact's config and per-layer norms; optionally its logit lens and a plot."""

    directory: str = field(metadata={"help": "a steering artifact folder"})
    json: bool = field(default=False, metadata={"help": "machine-readable output"})
    logit_lens: bool = field(default=False, metadata={"help": "the tokens each layer's vector promotes and demotes"})
    top: int = field(default=10, metadata={"help": "tokens per layer in the logit lens"})
    model: str | None = field(default=None, metadata={"help": "base for the logit lens (default: the artifact's)"})
    plot: str | None = field(default=None, metadata={"help": "PNG: per-layer norms and cosine similarity between layers"})
    compare: str | None = field(default=None, metadata={"help": "a second artifact: the plot adds their layer-wise cosines"})

    def __post_init__(self) -> None:
        _positive("top", self.top)


@dataclass
class ExportArguments:
    """`brep-rl export ART --out v.gguf`: the bias vectors as a llama.cpp control vector, or a PEFT LoRA adapter (the
    LoRA reference) as a llama.cpp LoRA adapter."""

    artifact: str = field(metadata={"help": "a steering artifact folder, or a PEFT LoRA adapter folder"})
    out: str = field(metadata={"help": "the control-vector or LoRA file to write (.gguf)"})
    format: Literal["gguf"] = "gguf"
    scale: float = field(default=1.0, metadata={"help": "strength baked into the file"})
    bias_only: bool = field(default=False, metadata={"help": "export a bias+prefix artifact's bias part (the prefix is dropped)"})
    model: str | None = field(default=None, metadata={"help": "a LoRA adapter's base (default: the one its adapter_config.json names)"})


@dataclass
class MergeArguments:
    """`brep-rl merge ART --out DIR`: an HF model folder with the bias folded into the MLP biases."""

    artifact: str = field(metadata={"help": "a steering artifact folder (bias mode)"})
    out: str = field(metadata={"help": "the model folder to write"})
    model: str | None = field(default=None, metadata={"help": "the base (default: the artifact's)"})
    dtype: Dtype = "float32"


@dataclass
class BlendArguments:
    """`brep-rl blend A B --weights 0.5,0.5 --out C`: the weighted sum of artifacts of one base, mode and layers."""

    artifacts: list[str] = field(metadata={"help": "two or more artifact folders"})
    out: str = field(metadata={"help": "the artifact folder to write"})
    weights: str | None = field(default=None, metadata={
        "help": "comma-separated, one per artifact (default: equal); a negative first weight needs the = form: "
                "--weights=-1,2 extrapolates from A through B"})

    def weight_list(self) -> list[float]:
        if self.weights is None:
            return [1.0 / len(self.artifacts)] * len(self.artifacts)
        try:
            values = [float(w) for w in self.weights.split(",")]
        except ValueError:
            values = []
        if len(values) != len(self.artifacts):
            raise ConfigError(f"--weights: expected {len(self.artifacts)} comma-separated numbers, got {self.weights!r}")
        return values

    def __post_init__(self) -> None:
        self.weight_list()


@dataclass
class LoraArguments:
    """The LoRA references (`brep-rl lora`: GRPO, `brep-rl lora-sft`: SFT)."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = 32
    lora_target_modules: str = field(default="all-linear", metadata={"help": "PEFT target_modules"})

    def __post_init__(self) -> None:
        _positive("lora_r", self.lora_r)


@dataclass
class EvidenceArguments:
    """`brep-rl evidence`: the learning-evidence matrix."""

    plan: str = field(metadata={"help": "matrix YAML, e.g. configs/evidence/smollm2_chain_sum.yaml", "aliases": ["--config"]})


def default_threads() -> int:
    """torch threads per process: the cores shared among this machine's processes of the job."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
