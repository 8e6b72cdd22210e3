# `make demo` and `make test` set up the environment themselves (scripts/setup.sh is idempotent).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR := cpu

.PHONY: setup lint test test-fast demo bench evidence evidence-stepwise evidence-up-proj chain-sum-failures grpo-soup evidence-issue8 gsm8k gsm8k-format gsm8k-lora

setup:
	@bash scripts/setup.sh

lint: setup
	@.venv/bin/ruff check .

# pytest exits 5 when it collects no test: not a failure of the suite.
test: setup
	@$(PY) -m pytest -q --timeout 1800 tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-fast: setup
	@$(PY) -m pytest -q -m "not slow" tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# The main job: GRPO of bias vectors on SmolLM2-135M (offline), then base vs steered on held-out problems.
demo: setup
	@.venv/bin/accelerate launch --config_file configs/accelerate/single.yaml scripts/grpo.py --output_dir runs/demo --overwrite_output_dir true $(ARGS)

# Every benchmark, one after another (run nothing else meanwhile): JSON + markdown tables in benchmarks/results/.
bench: setup
	@cd benchmarks && for b in generation_overhead verifier_throughput rollout_backends gsm8k_eval_time grpo_cost multi_process sampling_cost packing; do \
		echo "== $$b"; ../$(PY) $$b.py || exit 1; done

# Issue #15: the chain_sum picks at equal wall-clock (SFT-only, SFT -> GRPO, GRPO-only), picked on validation,
# reported on 500 test problems and on GSM8K. 95 min in one sitting on 2 CPU cores on a fast day (more on slow ones); re-running resumes.
evidence: setup
	@$(PY) scripts/evidence.py --config configs/evidence/smollm2_chain_sum_picks.yaml

# Issue #15: the stepwise picks (SFT-only on stepwise scratchpads, SFT -> GRPO from its pick), the best chain_sum
# vectors; 90 min on 2 CPU cores (docs/results.md); re-running resumes.
evidence-stepwise: setup
	@$(PY) scripts/evidence.py --config configs/evidence/smollm2_chain_sum_stepwise.yaml

# Issue #15: the same two runs with the vectors on mlp.up_proj (BREP's site), the best chain_sum vectors; generated
# with transformers, ~1.6 h on 2 CPU cores (projected from its stages' 85 min; docs/results.md); re-running resumes.
evidence-up-proj: setup
	@$(PY) scripts/evidence.py --config configs/evidence/smollm2_chain_sum_up_proj.yaml

# The held-out chain_sum config of issue #15 (2 terms, 1-2 digits), as `brep-rl eval` flags.
CHAIN_SUM := --task rg:chain_sum --rg_config '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}'

# Issue #15: GRPO from the stepwise SFT -> GRPO pick on the train problems it still answers wrong: a greedy eval of it
# on 1,200 train problems (~10 min on 2 CPU cores), then 10 GRPO steps on its failures (~35 min). Both resume.
chain-sum-failures: setup
	@.venv/bin/brep-rl eval $(CHAIN_SUM) \
		--split train --limit 1200 --max_new_tokens 64 --batch_size 64 \
		--steering artifacts/smollm2-chain-sum-sft-stepwise-grpo --output runs/eval_train_stepwise_grpo
	@.venv/bin/brep-rl grpo --config configs/grpo_smollm2_stepwise_failures.yaml --resume_from_checkpoint last

# Issue #15: GRPO-only (no SFT) past 50%: the shipped GRPO-only pick averaged with the checkpoints of two short runs
# from it (an 80-step cool-down, 20 steps of a 16-prompt batch): 13 vectors, equal weights; then the average beside
# the pick on 500 validation and 500 test problems. ~40 min on 2 CPU cores (13 + 19 of training, 6 of evaluation;
# docs/results.md); both runs resume.
GRPO_ONLY_PICK := artifacts/smollm2-chain-sum-grpo-demonstrations
grpo-soup: setup
	@.venv/bin/brep-rl grpo --config configs/grpo_smollm2_demonstrations_cooldown.yaml --resume_from_checkpoint last
	@.venv/bin/brep-rl grpo --config configs/grpo_smollm2_demonstrations_b128.yaml --resume_from_checkpoint last
	@.venv/bin/brep-rl blend --out runs/grpo_soup --artifacts $(GRPO_ONLY_PICK) \
		$(foreach s,10 20 30 40 50 60 70 80,runs/grpo_demonstrations_scratchpad_cooldown/checkpoint-$(s)) \
		$(foreach s,5 10 15 20,runs/grpo_demonstrations_b128/checkpoint-$(s))
	@.venv/bin/brep-rl eval $(CHAIN_SUM) --fallback last_number \
		--split train --offset 4000 --limit 500 --max_new_tokens 32 \
		--steering pick=$(GRPO_ONLY_PICK) --steering soup=runs/grpo_soup --output runs/eval_grpo_soup_validation
	@.venv/bin/brep-rl eval $(CHAIN_SUM) --fallback last_number --split test --limit 500 --max_new_tokens 128 \
		--steering pick=$(GRPO_ONLY_PICK) --steering soup=runs/grpo_soup --output runs/eval_grpo_soup_test

# Issue #8's matrix: every variant at a small fixed budget (modes, restraint, LoRA). About 2 hours; resumes.
evidence-issue8: setup
	@$(PY) scripts/evidence.py --config configs/evidence/smollm2_chain_sum.yaml

# Issue #17: SFT of bias vectors on GSM8K train (picked on its validation part), then base vs steered on all 1,319
# GSM8K test problems, greedy, paired. About 25 min of training and 40 min of evaluation on 2 CPU cores; re-running
# the evaluation resumes. artifacts/smollm2-gsm8k is the runs/gsm8k_sft/best this writes.
gsm8k: setup
	@.venv/bin/brep-rl sft --config configs/gsm8k/sft.yaml --overwrite_output_dir true
	@.venv/bin/brep-rl eval --task gsm8k --split test --limit 1319 --batch_size 64 --max_new_tokens 256 \
		--steering gsm8k-sft-pick=runs/gsm8k_sft/best --output runs/gsm8k_test

# Issue #17's format target: GRPO from artifacts/smollm2-gsm8k that rewards the `#### N` format as much as a right
# answer, calculator in the rollouts (48 steps, ~75 min on 2 CPU cores), then its last step on all of GSM8K test with
# the calculator, beside the base and the SFT pick (~15 min per steered variant, ~25-45 for the base). Both resume.
# artifacts/smollm2-gsm8k-grpo-format is the runs/gsm8k_grpo_format/checkpoint-48 this writes.
gsm8k-format: setup
	@.venv/bin/brep-rl grpo --config configs/gsm8k/grpo_format.yaml --resume_from_checkpoint last
	@.venv/bin/brep-rl eval --task gsm8k --split test --limit 1319 --batch_size 64 --max_new_tokens 256 --calculator true \
		--steering artifacts/smollm2-gsm8k --steering gsm8k-grpo-format-48=runs/gsm8k_grpo_format/checkpoint-48 --output runs/gsm8k_test_format

# Issue #17's reference: a LoRA r16 on the rows `make gsm8k` trains vectors on (`brep-rl lora-sft`, lr 5e-4, ~16-20 min
# on 2 CPU cores), then all of GSM8K test with the calculator on llama.cpp, beside the base and the shipped format
# pick (the LoRA as a llama.cpp LoRA adapter; ~60 min on a slow day: base 23, format pick 14, LoRA 24). Both resume.
gsm8k-lora: setup
	@.venv/bin/brep-rl lora-sft --config configs/gsm8k/sft.yaml --learning_rate 0.0005 --validation_steps 0 \
		--output_dir runs/gsm8k_lora_sft --resume_from_checkpoint last
	@.venv/bin/brep-rl eval --task gsm8k --split test --limit 1319 --batch_size 64 --max_new_tokens 256 --calculator true \
		--steering artifacts/smollm2-gsm8k-grpo-format --lora gsm8k-lora-sft=runs/gsm8k_lora_sft \
		--output runs/gsm8k_test_calc_lora
