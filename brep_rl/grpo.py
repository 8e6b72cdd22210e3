"""GRPO of steering vectors on verifiable math rewards, on TRL's GRPOTrainer.

What differs from plain TRL:
- only the vectors train; generation and the loss both run through the same hooks, and the loss forward
  sets each row's response start (the padded prompt width) so the prefix window is exact;
- the KL reference (beta > 0) is the same model with steering disabled, not a second copy of the base;
- after every optimizer step the vectors are projected back inside their norm ball;
- checkpoints hold the vectors and optimizer state (KB), never the base;
- verifier timeouts/errors are logged every step.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from brep_rl.data import DataError, TaskArguments, json_mapping, prompt_batch
from brep_rl.evaluate import EvalSettings
from brep_rl.rollout import Backend, Sampling, TransformersBackend, hash_seed, make_backend
from brep_rl.steering import SteeringVectors
from brep_rl.training import (
    ModelArguments, RestraintCallback, SteeringArguments, SteeringTrainerMixin, final_eval, fit_to_machine,
    load_for_training, quiet_dependency_warnings, train_and_save,
)
from reward import format_reward, guarded, make_accuracy_reward, reward_failures, verifier_stats

logger = logging.getLogger(__name__)

CHAIN_SUM_2X2 = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}'


@dataclass
class GRPODataArguments(TaskArguments):
    task: str = field(default="rg:chain_sum", metadata={"help": "gsm8k | math500 | rg:<name> | path.jsonl"})
    rg_config: str | None = field(default=CHAIN_SUM_2X2, metadata={"help": "reasoning-gym config, JSON"})
    fallback: str = field(default="last_number", metadata={"help": "answer extraction without \\boxed{} or ####: last_number | none"})
    format_reward_weight: float = field(default=0.0, metadata={"help": "weight of the #### / \\boxed{} format reward (0: accuracy only)"})
    extra_rewards: str | None = field(default=None, metadata={"help": "comma-separated extra TRL reward functions as module:function, weight 1 each"})
    eval_task: str | None = field(default=None, metadata={"help": "task of the final base vs steered eval (default: the training task)"})
    eval_split: str = "test"
    eval_limit: int = field(default=50, metadata={"help": "problems in the final eval (0: skip it)"})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "default: max_completion_length"})
    eval_rg_config: str | None = field(default=None, metadata={"help": "default: rg_config when eval_task is the training task"})


@dataclass
class SteeringGRPOConfig(GRPOConfig):
    """GRPOConfig with defaults for a few KB of vectors on a CPU (TRL's are for full fine-tuning on GPUs)."""

    output_dir: str = "runs/grpo"
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "constant"  # a warmup's first step has lr 0: a twelfth of a 12-step run lost
    max_steps: int = 12
    per_device_train_batch_size: int = 16
    num_generations: int | None = 8
    max_completion_length: int | None = 32
    temperature: float = 0.7
    beta: float = 0.0
    weight_decay: float = 0.0
    logging_steps: float = 1
    save_steps: float = 4
    save_total_limit: int | None = 2
    bf16: bool | None = False
    activation_checkpointing: bool | None = False  # it re-runs forwards outside the steering hooks
    dataloader_pin_memory: bool = False
    seed: int = 0
    rollout_backend: str = field(default="auto", metadata={"help": "auto | transformers | llama.cpp: what generates the "
                                 "rollouts (auto: llama.cpp for a GGUF base when llama-cpp-python is installed)"})

    def __post_init__(self) -> None:
        fit_to_machine(self)
        super().__post_init__()


class SteeringDisabled(nn.Module):
    """The KL reference policy: the very same model with steering switched off (no second copy in memory)."""

    def __init__(self, model: nn.Module, steer: SteeringVectors):
        super().__init__()
        object.__setattr__(self, "policy", model)  # not a submodule: it is the trained model, not a copy
        object.__setattr__(self, "steer", steer)

    @property
    def config(self):
        return self.policy.config

    def forward(self, *args, **kwargs):
        with self.steer.disabled():
            return self.policy(*args, **kwargs)


class SyncCallback(TrainerCallback):
    """Pushes the vectors to the rollout backend after every optimizer step (after the restraint's projection)."""

    def __init__(self, backend: Backend, steer: SteeringVectors):
        self.backend, self.steer = backend, steer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.backend.sync(self.steer)


class SteeringGRPOTrainer(SteeringTrainerMixin, GRPOTrainer):
    """`backend`: None or a TransformersBackend generates with TRL's own loop; any other backend (llama.cpp)
    through TRL's `rollout_func`, with the vectors pushed to it after every optimizer step."""

    def __init__(self, model, steer: SteeringVectors, args: SteeringGRPOConfig, backend: Backend | None = None, **kwargs):
        external = backend is not None and not isinstance(backend, TransformersBackend)
        if external:
            check_sampling(args, backend)
            kwargs["rollout_func"] = self._rollout
        beta = args.beta
        args.beta = 0.0  # with beta > 0 TRL would load a second full model as the reference
        try:
            with _quiet_experimental():
                super().__init__(model=model, args=args, **kwargs)
        finally:
            args.beta = beta
        self.beta = beta
        self.ref_model = SteeringDisabled(model, steer) if beta else None
        self.steer = steer
        self.backend = backend
        self.check_steering_args()
        self.add_callback(RestraintCallback(steer))
        if external:
            backend.sync(steer)
            self.add_callback(SyncCallback(backend, steer))
        self._rollout_calls = 0
        self._trainer_logps: torch.Tensor | None = None
        self._verifier_seen = verifier_stats()
        self._failures_seen = dict(reward_failures)

    def _rollout(self, prompts: list, trainer: GRPOTrainer) -> dict[str, list]:
        """TRL's rollout_func: the chat-templated prompts of this process, generated by the external backend."""
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        groups: list[tuple[list[int], int]] = []  # consecutive copies of one prompt (TRL repeats each per generation)
        for ids in prompt_ids:
            if groups and groups[-1][0] == ids:
                groups[-1] = (ids, groups[-1][1] + 1)
            else:
                groups.append((ids, 1))
        sizes = {n for _, n in groups}
        self._rollout_calls += 1
        seed = hash_seed(self.args.seed, self.state.global_step, self.accelerator.process_index, self._rollout_calls)
        sampling = Sampling(self.max_completion_length, self.temperature, self.top_p, self.top_k or 0, seed)
        if len(sizes) == 1:
            rollouts = self.backend.generate([ids for ids, _ in groups], sizes.pop(), sampling)
        else:  # uneven groups (a group split across processes): every copy is its own prompt
            rollouts = self.backend.generate(prompt_ids, 1, sampling)
        return {"prompt_ids": rollouts.prompt_ids, "completion_ids": rollouts.completion_ids, "logprobs": rollouts.logprobs}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        # prompt (left-padded) + completion: every row's answer starts at the padded prompt width
        with self.steer.window(input_ids.size(1) - logits_to_keep):
            if compute_aux_loss or any(v is not None for v in multimodal.values()):
                out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                 batch_size, compute_entropy, compute_aux_loss, **multimodal)
            else:
                out = self._shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy)
        self._trainer_logps = out[0]
        return out

    def _shared_prompt_logps(self, model, input_ids, attention_mask, logits_to_keep, compute_entropy):
        """TRL's per-token log-probs, with each distinct prompt run once instead of once per completion.

        A GRPO batch holds every prompt num_generations times, and the prompt is most of each row (here ~85 of ~117
        tokens), so the loss forward and backward cost a fraction. The prompt minus its last token runs once per
        distinct prompt (with the steering window, in the graph: the vectors act there too); its KV cache is
        repeated to every row of the group; the rows then run [last prompt token, completion] on it, through the
        same fused LM head TRL uses. Equal to the plain forward up to float rounding (tested)."""
        prompt_width = input_ids.size(1) - logits_to_keep
        rows = torch.cat([input_ids[:, :prompt_width], attention_mask[:, :prompt_width]], dim=1)
        distinct, group = torch.unique(rows, dim=0, return_inverse=True)
        if prompt_width < 2 or len(distinct) == len(rows):
            return GRPOTrainer._get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                                                  compute_entropy=compute_entropy)
        prompts, prompt_mask = distinct[:, : prompt_width - 1], distinct[:, prompt_width : 2 * prompt_width - 1]
        with self.accelerator.autocast():
            # the unwrapped module: a DDP-wrapped one must see exactly one forward per backward
            cache = self.accelerator.unwrap_model(model)(input_ids=prompts, attention_mask=prompt_mask, use_cache=True,
                                                         logits_to_keep=1).past_key_values
            cache.batch_select_indices(group)
            tail = input_ids[:, prompt_width - 1 :]
            labels = tail.masked_fill(attention_mask[:, prompt_width - 1 :] == 0, -100)
            labels[:, 0] = -100  # the last prompt token is input only
            out = model(input_ids=tail, attention_mask=attention_mask, past_key_values=cache, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -logits_to_keep:], out.entropy[:, -logits_to_keep:] if compute_entropy else None, None

    def _compute_loss(self, model, inputs):
        self._trainer_logps = None
        loss = super()._compute_loss(model, inputs)
        sampled = inputs.get("sampling_per_token_logps")
        if sampled is not None and self._trainer_logps is not None:
            # how far the backend's sampling distribution is from the trainer's (quantisation, kernels)
            mask = inputs["completion_mask"].bool()
            diff = (self._trainer_logps.detach() - sampled)[mask]
            mode = "train" if self.model.training else "eval"
            gathered = self.accelerator.gather(torch.stack([diff.abs().mean(), diff.abs().max(), (-diff).mean()]).reshape(1, 3))
            self._metrics[mode]["rollout/logp_diff_mean"].append(gathered[:, 0].mean().item())
            self._metrics[mode]["rollout/logp_diff_max"].append(gathered[:, 1].max().item())
            self._metrics[mode]["rollout/kl_sampler_trainer"].append(gathered[:, 2].mean().item())
        self._trainer_logps = None
        return loss

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        now = verifier_stats()
        mode = "train" if self.model.training else "eval"
        for key in ("timeouts", "errors"):
            self._metrics[mode][f"verifier/{key}"].append(now[key] - self._verifier_seen[key])
        self._verifier_seen = now
        self._metrics[mode]["reward_failures"].append(sum(reward_failures.values()) - sum(self._failures_seen.values()))
        self._failures_seen = dict(reward_failures)
        return rewards

    def provenance(self) -> dict:
        return {**super().provenance(), "beta": self.beta, "num_generations": self.args.num_generations,
                "temperature": self.args.temperature, "max_completion_length": self.args.max_completion_length}


def check_sampling(args: SteeringGRPOConfig, backend: Backend) -> None:
    """External backends sample with temperature, top-p and top-k only: refuse settings they would ignore."""
    wrong = ([f"min_p={args.min_p}"] if args.min_p else []) + (
        [f"repetition_penalty={args.repetition_penalty}"] if args.repetition_penalty != 1.0 else [])
    if wrong:
        raise ValueError(f"the {backend.name} rollout backend does not implement {', '.join(wrong)}: "
                         "unset it or use --rollout_backend transformers")


@contextlib.contextmanager
def _quiet_experimental():
    """TRL warns that rollout_func is experimental on every construction; we pin TRL and test our use of it."""
    previous = os.environ.get("TRL_EXPERIMENTAL_SILENCE")
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRL_EXPERIMENTAL_SILENCE"]
        else:
            os.environ["TRL_EXPERIMENTAL_SILENCE"] = previous


def prompt_dataset(problems, instruction: str | None, system_prompt: str | None) -> Dataset:
    """Conversational prompts (TRL applies the chat template, as the eval harness does) with the gold `answer`."""
    rows = []
    for p in problems:
        content = f"{p.question}\n{instruction}" if instruction else p.question
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": content}]
        rows.append({"prompt": messages, "answer": p.answer})
    return Dataset.from_list(rows)


def reward_functions(data_args: GRPODataArguments) -> tuple[list, list[float]]:
    """Accuracy (weight 1), the optional format reward, and any extra `module:function` rewards (weight 1 each)."""
    funcs, weights = [make_accuracy_reward(fallback=data_args.fallback)], [1.0]
    if data_args.format_reward_weight > 0:
        funcs.append(format_reward)
        weights.append(data_args.format_reward_weight)
    for path in filter(None, (data_args.extra_rewards or "").split(",")):
        module, _, name = path.strip().partition(":")
        try:
            funcs.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as e:
            raise ValueError(f"extra_rewards: cannot import {path.strip()!r} as module:function ({e})") from None
        weights.append(1.0)
    return funcs, weights


def run_grpo(model_args: ModelArguments, steer_args: SteeringArguments, data_args: GRPODataArguments, train_args: SteeringGRPOConfig) -> SteeringGRPOTrainer:
    """Train with GRPO, save the artifact to output_dir and (main process) compare base vs steered on held-out problems."""
    problems = data_args.load_problems(train_args.seed)
    if not all(p.answer for p in problems):
        raise DataError(f"task {data_args.task!r}: every problem needs a gold answer for the reward")

    def calibration(tokenizer):
        return prompt_batch(tokenizer, problems[:8], data_args.instruction, data_args.system_prompt)

    model, tokenizer, steer = load_for_training(model_args, steer_args, calibration)
    steer.config.provenance = {**steer.config.provenance, "stage": "grpo", "task": data_args.task, "split": data_args.split,
                               "rg_config": json_mapping(data_args.rg_config)}
    funcs, weights = reward_functions(data_args)
    train_args.reward_weights = weights
    backend = make_backend(train_args.rollout_backend, model, tokenizer, model_args.model, [steer.config], torch.get_num_threads())
    trainer = SteeringGRPOTrainer(
        model=model, steer=steer, args=train_args, backend=backend, reward_funcs=[guarded(f) for f in funcs],
        train_dataset=prompt_dataset(problems, data_args.instruction, data_args.system_prompt), processing_class=tokenizer,
    )
    output = train_and_save(trainer)
    if trainer.is_world_process_zero():
        print(f"\nsteering artifact: {output} (inspect it with `brep-rl inspect {output}`)")
        if data_args.eval_limit > 0:
            final_eval(trainer, tokenizer, eval_settings(data_args, train_args), trainer.backend)
    return trainer


def eval_settings(data_args: GRPODataArguments, train_args: SteeringGRPOConfig) -> EvalSettings:
    """Greedy, on held-out problems of the eval task (default: the training task's test split)."""
    same_task = data_args.eval_task in (None, data_args.task)
    return EvalSettings(
        task=data_args.task if same_task else data_args.eval_task, split=data_args.eval_split, limit=data_args.eval_limit,
        max_new_tokens=data_args.eval_max_new_tokens or train_args.max_completion_length, instruction=data_args.instruction,
        system_prompt=data_args.system_prompt, fallback=data_args.fallback, seed=train_args.seed,
        rg_config=json_mapping(data_args.eval_rg_config if data_args.eval_rg_config or not same_task else data_args.rg_config),
        backend=train_args.rollout_backend,
    )


def main(argv: list[str] | None = None) -> SteeringGRPOTrainer:
    """`brep-rl grpo` / `scripts/grpo.py`: --config YAML plus command-line overrides (TRL's parser)."""
    from trl import TrlParser

    quiet_dependency_warnings()
    parser = TrlParser((ModelArguments, SteeringArguments, GRPODataArguments, SteeringGRPOConfig))
    model_args, steer_args, data_args, train_args = parser.parse_args_and_config(argv)
    return run_grpo(model_args, steer_args, data_args, train_args)
