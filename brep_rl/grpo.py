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
import logging
import os
import random
from collections import Counter
from pathlib import Path

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from trl import GRPOTrainer

from brep_rl.arguments import (
    EvalSettings,
    GRPODataArguments,
    ModelArguments,
    SteeringArguments,
    SteeringGRPOConfig,
    ValidationArguments,
)
from brep_rl.curriculum import Curriculum
from brep_rl.data import prompt_batch, with_scratchpads
from brep_rl.dynamic_sampling import ScoredGroup, informative_groups
from brep_rl.errors import ConfigError, DataError
from brep_rl.evaluate import failed_problems
from brep_rl.packing import pack_micro_batches, signal_rows
from brep_rl.rollout import Backend, Calculator, Sampling, TransformersBackend, hash_seed, make_backend
from brep_rl.steering import SteeringVectors
from brep_rl.training import (
    SteeringTrainerMixin,
    add_validation,
    claim_output_dir,
    final_eval,
    load_for_training,
    train_and_save,
)
from reward import guarded, reward_failures, reward_function, reward_functions, verifier_stats

logger = logging.getLogger(__name__)

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


class _SyncedByCallback:
    """Stands where TRL expects its vLLM engine, so that TRL's importance-sampling correction applies to our
    rollouts too; the weights it would sync are the vectors, which SyncCallback pushes after every optimizer step."""

    def sync_weights(self) -> None:
        pass


class SteeringGRPOTrainer(SteeringTrainerMixin, GRPOTrainer):
    """`backend`: None or a TransformersBackend generates with TRL's own loop, unless dynamic sampling needs the
    rollouts first; any other backend (llama.cpp) through TRL's `rollout_func`, with the vectors pushed to it after
    every optimizer step and TRL's truncated importance sampling correcting for the sampler's distribution.
    `accuracy_reward`: the binary reward dynamic sampling filters groups on."""

    def __init__(self, model, steer: SteeringVectors, args: SteeringGRPOConfig, backend: Backend | None = None,
                 accuracy_reward=None, curriculum: Curriculum | None = None, curriculum_rows=None, **kwargs):
        own_loop = backend is None or (isinstance(backend, TransformersBackend) and not args.dynamic_sampling)
        if args.calculator and (backend is None or isinstance(backend, TransformersBackend)):
            raise ConfigError("--calculator writes into the rollouts as they are sampled: it needs --rollout_backend "
                              "llama.cpp (or auto with a GGUF base and llama-cpp-python installed)")
        if args.dynamic_sampling and (backend is None or accuracy_reward is None):
            raise ConfigError("--dynamic_sampling needs a rollout backend and the accuracy reward to filter groups on")
        if curriculum is not None and (accuracy_reward is None or curriculum_rows is None):
            raise ConfigError("a curriculum needs the accuracy reward and a way to turn its problems into prompts")
        if not own_loop:
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
        self.backend = backend
        self.tool = Calculator(self.processing_class) if args.calculator else None  # also used by validation
        self.accuracy_reward = accuracy_reward
        self.curriculum, self.curriculum_rows = curriculum, curriculum_rows  # rows: (problems) -> dataset rows
        self.setup_steering(steer)
        if not own_loop:
            backend.sync(steer)
            self.add_callback(SyncCallback(backend, steer))
            if args.vllm_importance_sampling_correction and not isinstance(backend, TransformersBackend):
                self.use_vllm = True  # TRL gates its off-policy correction on vLLM; llama.cpp samples off-policy alike
                self.vllm_generation, self._last_loaded_step = _SyncedByCallback(), -1
        self._rollout_calls: tuple[int, int] = (-1, 0)  # (global step, calls at that step): seeds survive a resume
        # rollouts dynamic sampling already made, in batch order: (prompt ids, (ids fed, completions, logprobs, tool
        # masks)) per group; by position, not by prompt, since a small training set puts one problem in a batch twice
        self._stash: list[tuple[tuple[int, ...], tuple[list, list, list, list | None]]] = []
        self._guided: Counter = Counter()  # hinted groups this step (and how many then had a signal), demonstrations
        self._drawn_accuracy: list[float] | None = None  # this step's groups as dynamic sampling drew them
        self._trainer_logps: torch.Tensor | None = None
        # packing changes which micro-batch a row is in: exact only for a loss summed over the generation batch
        self.packing = (args.pack_micro_batches and self.loss_type in ("dapo", "cispo") and self.num_iterations == 1
                        and args.steps_per_generation == args.gradient_accumulation_steps
                        and self.top_entropy_quantile == 1.0 and not self._entropy_bonus_enabled)
        self._verifier_seen = verifier_stats()
        self._failures_seen = dict(reward_failures)

    def _sampling(self, *purpose: object) -> Sampling:
        """Sampling settings with a seed fixed by the run seed, the step, the rank and `purpose` (not by call order:
        a resumed run draws what an uninterrupted one draws)."""
        seed = hash_seed(self.args.seed, self.state.global_step, self.accelerator.process_index, *purpose)
        return Sampling(self.max_completion_length, self.temperature, self.top_p, self.top_k or 0, seed)

    def _rollout(self, prompts: list, trainer: GRPOTrainer) -> dict[str, list]:
        """TRL's rollout_func: the chat-templated prompts of this process, generated by the backend (or taken from
        what dynamic sampling generated for them)."""
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        stash, self._stash = self._stash, []
        n = self.num_generations
        if stash and len(prompt_ids) == n * len(stash) and all(
                tuple(prompt_ids[i * n + j]) == key for i, (key, _) in enumerate(stash) for j in range(n)):
            made = [rollout for _, rollout in stash]  # (prompt ids fed, hint included; completions; logprobs; masks)
            return {"prompt_ids": [fed for fed, _, _, _ in made for _ in range(n)],
                    "completion_ids": [c for _, completions, _, _ in made for c in completions],
                    "logprobs": [lp for _, _, logprobs, _ in made for lp in logprobs],
                    **({"env_mask": [m for *_, masks in made for m in masks]} if self.tool is not None else {})}
        groups: list[tuple[list[int], int]] = []  # consecutive copies of one prompt (TRL repeats each per generation)
        for ids in prompt_ids:
            if groups and groups[-1][0] == ids:
                groups[-1] = (ids, groups[-1][1] + 1)
            else:
                groups.append((ids, 1))
        step, calls = self._rollout_calls
        step, calls = (step, calls + 1) if step == self.state.global_step else (self.state.global_step, 1)
        self._rollout_calls = (step, calls)
        sampling = self._sampling(calls)
        sizes = {n for _, n in groups}
        if len(sizes) == 1:
            rollouts = self.backend.generate([ids for ids, _ in groups], sizes.pop(), sampling, tool=self.tool)
        else:  # uneven groups (a group split across processes): every copy is its own prompt
            rollouts = self.backend.generate(prompt_ids, 1, sampling, tool=self.tool)
        # env_mask: TRL leaves the tokens a tool wrote (0) out of the loss and the importance ratios
        return {"prompt_ids": rollouts.prompt_ids, "completion_ids": rollouts.completion_ids, "logprobs": rollouts.logprobs,
                **({"env_mask": rollouts.tool_mask} if self.tool is not None else {})}

    def _prepare_inputs(self, generation_batch):
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        # a new buffer: TRL has just generated, shuffled and split a training batch; pack it (brep_rl/packing.py)
        if self.packing and self._buffered_inputs is not buffered:
            keep_rows = None  # with beta > 0 a zero-advantage row still has the KL term's gradient
            if not self.beta:  # at least a row per micro-batch, and as many rows on every process
                local = torch.tensor([signal_rows(self._buffered_inputs)], device=self.accelerator.device)
                keep_rows = max(int(self.accelerator.gather(local).max()), self.args.steps_per_generation)
            self._buffered_inputs, stats = pack_micro_batches(self._buffered_inputs, keep_rows)
            for key, value in stats.as_metrics().items():
                self._metrics["train"][key].append(value)
            inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]
        return inputs

    # ---- dynamic sampling ------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        whole_groups = len(inputs) % self.num_generations == 0
        if self.curriculum is not None and self.model.training and whole_groups:
            inputs = [row for group in self._fresh_groups(len(inputs) // self.num_generations, 0) for row in group]
        if self.args.dynamic_sampling and self.model.training and whole_groups:
            inputs = self._informative_inputs(inputs)
        return super()._generate_and_score_completions(inputs)

    def _informative_inputs(self, inputs: list[dict]) -> list[dict]:
        """This process's groups with a signal (brep_rl/dynamic_sampling.py); their rollouts wait in the stash."""
        n = self.num_generations
        groups = [inputs[i : i + n] for i in range(0, len(inputs), n)]
        self._drawn_accuracy = [] if self.curriculum is not None else None
        batch, stats = informative_groups(
            self._score_groups(groups, 0),
            lambda count, round_: self._score_groups(self._fresh_groups(count, round_), round_),
            self.args.max_refills,
        )
        self._stash = [group.rollout for group in batch]
        metrics = stats.as_metrics(len(groups))
        if self.args.hint_share:
            metrics |= {"hints/share": self.hint_share(), "hints/groups": float(self._guided["hinted"]),
                        "hints/informative": float(self._guided["informative"])}
        if self.args.demonstrations:
            metrics["demonstrations/groups"] = float(self._guided["demonstrated"])
        self._guided = Counter()
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)
        return [row for group in batch for row in group.rows]

    def _score_groups(self, groups: list[list[dict]], round_: int) -> list[ScoredGroup]:
        """Generate and score `groups`. A group no sample of which is right is guided by its reference solution:
        with --hint_share it is generated again with the start of the solution given (the hint sits at the end of
        the prompt, so the loss and the rewards see only what the policy wrote after it); with --demonstrations
        the solution takes the place of its last sample (in every group with --demonstration_groups every)."""
        prompt_ids, _, _ = self._tokenize_prompts([group[0]["prompt"] for group in groups])
        scored = self._generate_scored(groups, prompt_ids, prompt_ids, ("dynamic", round_))
        if self._drawn_accuracy is not None:
            self._drawn_accuracy += [sum(group.accuracies) / len(group.accuracies) for group in scored]
        share = self.hint_share()
        unsolved = [i for i, group in enumerate(scored) if share and not any(group.accuracies) and group.rows[0].get("solution")]
        if unsolved:
            hinted = [prompt_ids[i] + hint_ids(self.processing_class, groups[i][0]["solution"], share) for i in unsolved]
            again = self._generate_scored([groups[i] for i in unsolved], [prompt_ids[i] for i in unsolved], hinted,
                                          ("hint", round_))
            for i, group in zip(unsolved, again):
                scored[i] = group
                self._guided["informative"] += group.informative
            self._guided["hinted"] += len(unsolved)
        if self.args.demonstrations:
            for group in scored:
                if self.args.demonstration_groups == "every" or not any(group.accuracies):
                    self._guided["demonstrated"] += self._demonstrate(group)
        return scored

    def _demonstrate(self, group: ScoredGroup) -> bool:
        """The reference solution in place of the group's last sample, so that a problem the policy never solves
        still has one right answer to move toward (LUFFY's off-policy guidance). Nobody sampled it: its sampler
        log-probs are NaN, which TRL's importance-sampling correction reads as ratio 1. False (group unchanged)
        when the problem has no solution, it does not fit in max_completion_length or its answer does not score."""
        row = group.rows[0]
        if not row.get("solution"):
            return False
        ids = demonstration_ids(self.processing_class, row["solution"])
        if len(ids) > self.max_completion_length:
            return False
        text = self.processing_class.decode(ids, skip_special_tokens=True)
        if not self.accuracy_reward(completions=[text], answer=[row["answer"]])[0]:
            return False
        _, (_, completions, logprobs, masks) = group.rollout
        completions[-1] = ids
        if logprobs[-1] is not None:
            logprobs[-1] = [float("nan")] * len(ids)
        if masks is not None:
            masks[-1] = [1] * len(ids)  # trained on, every token of it
        group.accuracies[-1] = 1.0
        return True

    def _generate_scored(self, groups: list[list[dict]], prompt_ids: list[list[int]], fed: list[list[int]],
                         purpose: tuple) -> list[ScoredGroup]:
        """`fed` (the prompts, hints included) generated and scored; the rollouts are stashed under `prompt_ids`,
        the prompts TRL will hand back to the rollout function."""
        n = self.num_generations
        rollouts = self.backend.generate(fed, n, self._sampling(*purpose), tool=self.tool)
        texts = self.processing_class.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        accuracies = self.accuracy_reward(completions=texts, answer=[row["answer"] for group in groups for row in group])
        logprobs = rollouts.logprobs or [None] * len(texts)
        masks = rollouts.tool_mask

        def rollout(i: int) -> tuple:
            rows = slice(i * n, (i + 1) * n)
            return tuple(prompt_ids[i]), (fed[i], rollouts.completion_ids[rows], logprobs[rows],
                                          masks[rows] if masks is not None else None)

        return [ScoredGroup(group, rollout(i), accuracies[i * n : (i + 1) * n]) for i, group in enumerate(groups)]

    def hint_share(self) -> float:
        """The share of the reference solution a hint gives at this step: --hint_share, falling linearly to 0 at
        --hint_decay_steps (default max_steps)."""
        decay = self.args.hint_decay_steps or self.args.max_steps
        return self.args.hint_share * max(0.0, 1.0 - self.state.global_step / decay)

    def _fresh_groups(self, count: int, round_: int) -> list[list[dict]]:
        """`count` prompts drawn from the training set (or the curriculum's current level), by a generator fixed by
        the step, rank and round."""
        seed = hash_seed(self.args.seed, self.state.global_step, self.accelerator.process_index, "refill", round_)
        if self.curriculum is not None:
            rows = self.curriculum_rows(self.curriculum.draw(count, seed))
        else:
            rng = random.Random(seed)
            rows = [self.train_dataset[rng.randrange(len(self.train_dataset))] for _ in range(count)]
        return [[dict(row) for _ in range(self.num_generations)] for row in rows]

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

    def resumed(self, checkpoint: str) -> None:
        super().resumed(checkpoint)
        if self.backend is not None:  # the backend holds a copy of the vectors: the resumed ones, from the first step
            self.backend.sync(self.steer)

    def _compute_loss(self, model, inputs):
        self._trainer_logps = None
        loss = super()._compute_loss(model, inputs) + self.steer.penalty_term(model.training)
        sampled = inputs.get("sampling_per_token_logps")
        if sampled is not None and self._trainer_logps is not None:
            # how far the backend's sampling distribution is from the trainer's (quantisation, kernels)
            # over sampled tokens: a demonstration's (NaN) were never sampled, nor were a tool's (tool_mask 0)
            sampled_tokens = inputs["completion_mask"].bool() & ~torch.isnan(sampled)
            if "tool_mask" in inputs:
                sampled_tokens &= inputs["tool_mask"].bool()
            diff = (self._trainer_logps.detach() - sampled).masked_fill(~sampled_tokens, float("nan"))
            stats = torch.stack([diff.abs().nanmean(), diff.abs().nan_to_num(0.0).max(), (-diff).nanmean()])
            gathered = self.accelerator.gather(stats.reshape(1, 3))
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["rollout/logp_diff_mean"].append(gathered[:, 0].nanmean().item())
            self._metrics[mode]["rollout/logp_diff_max"].append(gathered[:, 1].max().item())
            self._metrics[mode]["rollout/kl_sampler_trainer"].append(gathered[:, 2].nanmean().item())
        self._trainer_logps = None
        return loss

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        now, failures = verifier_stats(), dict(reward_failures)
        local = [now["timeouts"] - self._verifier_seen["timeouts"], now["errors"] - self._verifier_seen["errors"],
                 sum(failures.values()) - sum(self._failures_seen.values())]
        self._verifier_seen, self._failures_seen = now, failures
        total = self.accelerator.reduce(torch.tensor(local, dtype=torch.float32, device=self.accelerator.device), "sum")
        mode = "train" if self.model.training else "eval"
        for key, value in zip(("verifier/timeouts", "verifier/errors", "reward_failures"), total.tolist()):
            self._metrics[mode][key].append(value)  # every rank's failures, not the first rank's alone
        if self.curriculum is not None and mode == "train":
            drawn, self._drawn_accuracy = self._drawn_accuracy, None
            self._advance_curriculum(drawn if drawn is not None else self._group_accuracy(inputs, completions))
        return rewards

    def _group_accuracy(self, inputs: list[dict], completions: list) -> list[float]:
        n = self.num_generations
        scores = self.accuracy_reward(completions=completions, answer=[row["answer"] for row in inputs])
        return [sum(scores[i : i + n]) / n for i in range(0, len(scores) - n + 1, n)]

    def _advance_curriculum(self, accuracies: list[float]) -> None:
        """The accuracy of every group of this step from every rank (so every rank moves the same way) into the
        curriculum. With dynamic sampling these are the groups as drawn, before all-right and all-wrong ones were
        dropped and before hints: the trained groups alone pull the rolling accuracy toward 0.5, whatever the
        policy's accuracy on the level."""
        accuracies = gather_object(accuracies)
        level = self.curriculum.record(accuracies)
        self._metrics["train"]["curriculum/level"].append(float(level))
        self._metrics["train"]["curriculum/accuracy"].append(sum(accuracies) / len(accuracies))

    def extra_state(self) -> dict:
        return {"curriculum": self.curriculum.state()} if self.curriculum is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.curriculum is not None and "curriculum" in state:
            self.curriculum.load_state(state["curriculum"])

    def provenance(self) -> dict:
        return {**super().provenance(), "beta": self.beta, "num_generations": self.args.num_generations,
                "temperature": self.args.temperature, "max_completion_length": self.args.max_completion_length}


def check_sampling(args: SteeringGRPOConfig, backend: Backend) -> None:
    """External backends sample with temperature, top-p and top-k only: refuse settings they would ignore."""
    wrong = ([f"min_p={args.min_p}"] if args.min_p else []) + (
        [f"repetition_penalty={args.repetition_penalty}"] if args.repetition_penalty != 1.0 else [])
    if wrong:
        raise ConfigError(f"the {backend.name} rollout backend does not implement {', '.join(wrong)}: "
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


def prompt_rows(problems, instruction: str | None, system_prompt: str | None) -> list[dict]:
    """Conversational prompts (TRL applies the chat template, as the eval harness does) with the gold `answer`."""
    rows = []
    for p in problems:
        content = f"{p.question}\n{instruction}" if instruction else p.question
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": content}]
        rows.append({"prompt": messages, "answer": p.answer, "solution": p.solution})
    return rows


def hint_ids(tokenizer, solution: str, share: float) -> list[int]:
    """The first `share` of a worked solution's tokens, never its final "#### answer" line."""
    ids = tokenizer(solution.split("####")[0].rstrip(), add_special_tokens=False).input_ids
    return ids[: int(len(ids) * share)]


def demonstration_ids(tokenizer, solution: str) -> list[int]:
    """A worked solution as the completion a policy would have written: its tokens, then the end of the turn."""
    return tokenizer(solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def prompt_dataset(problems, instruction: str | None, system_prompt: str | None) -> Dataset:
    return Dataset.from_list(prompt_rows(problems, instruction, system_prompt))


def run_grpo(model_args: ModelArguments, steer_args: SteeringArguments, data_args: GRPODataArguments, train_args: SteeringGRPOConfig, val_args: ValidationArguments | None = None) -> SteeringGRPOTrainer:
    """Train with GRPO, save the artifact to output_dir and (main process) compare base vs steered on held-out problems."""
    if data_args.solutions != "reference" and not (train_args.demonstrations or train_args.hint_share):
        raise ConfigError(f"--solutions {data_args.solutions}: the solutions only reach training through "
                          "--demonstrations or --hint_share: set one")
    claim_output_dir(train_args)
    funcs, train_args.reward_weights = reward_functions(*data_args.reward_names(train_args.reward_weights), data_args.fallback,
                                                         data_args.allow_reward_imports)
    problems = data_args.training_problems(train_args.seed)
    if data_args.solutions != "reference":
        problems = with_scratchpads(problems, data_args.task, data_args.solutions)
    if data_args.train_on_failures:
        problems = failed_problems(problems, Path(data_args.train_on_failures), data_args.failures_of,
                                   data_args.source(train_args.seed))
    if not all(p.answer for p in problems):
        raise DataError(f"task {data_args.task!r}: every problem needs a gold answer for the reward")

    def calibration(tokenizer):
        return prompt_batch(tokenizer, problems[:8], data_args.instruction, data_args.system_prompt)

    model, tokenizer, steer = load_for_training(model_args, steer_args, calibration)
    steer.config.provenance = {**steer.config.provenance, "stage": "grpo", **data_args.provenance(),
                               **({"solutions": data_args.solutions} if data_args.solutions != "reference" else {}),
                               **({"mix": data_args.mix} if data_args.mix else {}),
                               **({"train_on_failures": data_args.train_on_failures, "failures_of": data_args.failures_of,
                                   "problems": len(problems)} if data_args.train_on_failures else {})}
    backend = make_backend(train_args.rollout_backend, model, tokenizer, model_args.model, [steer.config], torch.get_num_threads())
    curriculum = None
    if data_args.curriculum:
        curriculum = Curriculum(data_args.curriculum, data_args.curriculum_window, data_args.curriculum_raise,
                                data_args.curriculum_lower, data_args.curriculum_start_level)
    trainer = SteeringGRPOTrainer(
        model=model, steer=steer, args=train_args, backend=backend, reward_funcs=[guarded(f) for f in funcs],
        accuracy_reward=reward_function("accuracy", data_args.fallback), curriculum=curriculum,
        curriculum_rows=lambda problems: prompt_rows(problems, data_args.instruction, data_args.system_prompt),
        train_dataset=prompt_dataset(problems, data_args.instruction, data_args.system_prompt), processing_class=tokenizer,
    )
    add_validation(trainer, val_args, data_args, model_args, train_args.seed)
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
        rg_config=data_args.eval_rg_config if data_args.eval_rg_config or not same_task else data_args.rg_config,
        backend=train_args.rollout_backend, calculator=train_args.calculator,
    )


def main(argv: list[str] | None = None) -> SteeringGRPOTrainer:
    """`scripts/grpo.py` and tests: --config YAML plus command-line overrides (`brep-rl grpo` adds one-line errors)."""
    from brep_rl.cli import VERBS, parse

    return run_grpo(*parse("brep-rl grpo", VERBS["grpo"].types, argv))
