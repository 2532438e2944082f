"""
Mutation check of the tests: plausible one-line bugs, each put into a scratch copy of the repository (never the
working tree), must each make the tests named beside it fail. A mutant the tests do not catch "survives": the
tests have a hole there.

    python bench/mutants.py                       # every mutant (about 40 minutes on 2 busy cores), then a summary
    python bench/mutants.py collate_mask_shifted  # only the named mutants
    python bench/mutants.py --list                # names, files and tests, nothing run
    python bench/mutants.py --no-baseline         # skip the first run of all the named tests on unmutated code

It exits 1 when a mutant survives, or when the unmutated copy already fails the tests (then every mutant would
look caught). A new feature adds its own mutants to MUTANTS: the file, the original text (it must occur exactly
once in that file; tests/test_mutants.py checks), the mutated text, and the tests that must catch it, fewest and
fastest first (pytest stops at the first failure).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO, SFT = "tests/test_train_grpo.py::", "tests/test_train_sft.py::"
SAMPLER, MODEL = "tests/test_sampler.py::", "tests/test_model.py::"
SFT_FSDP = SFT + "test_fsdp_two_processes_with_eval_and_resume_equal_one_process"
GRPO_FSDP = GRPO + "test_fsdp_two_processes_with_eval_rollouts_reference_refresh_and_resume_equal_one"
WIRING = GRPO + "test_main_passes_the_right_tensors_to_the_loss_and_the_kl"
TEMPERATURE = GRPO + "test_sampler_and_trainer_log_probs_agree_at_temperature_0_7"
FREQUENCIES = SAMPLER + "test_generate_first_token_frequencies"
COLUMN_MAJOR = SAMPLER + "test_projection_weights_are_column_major_while_sampling_and_restored_after"
TRACES = "tests/test_make_traces.py::"
TASKS = "tests/test_tasks.py::"
PROMPT = TASKS + "test_training_and_evaluation_send_the_same_prompt_for_every_kind_of_task"
SCORE = TASKS + "test_score_adds_the_format_reward_and_the_overlong_penalty_to_the_task_reward"
SHARED_PROMPTS = MODEL + "test_shared_prompts_give_the_padded_rows_log_probs_and_gradients"
VERIFIER_CASES = "tests/test_verifier.py::test_case"
EVAL_TESTS = "tests/test_eval.py::"
EVAL_REPORTS = EVAL_TESTS + "test_eval_reports_every_metric_of_every_benchmark_in_each_output"
EVAL_COMBINED = (EVAL_TESTS +
                 "test_completions_of_every_problem_enter_the_combined_score_and_a_partial_benchmark_does_not")
EVAL_COMPLETIONS = EVAL_TESTS + "test_completions_keep_their_length_finish_and_benchmark_and_follow_the_limit"
EXPERIMENT_CACHE = "tests/test_experiments.py::test_cache_reads_a_run_back_only_while_its_inputs_are_the_same"
EXPERIMENT_INIT = "tests/test_experiments.py::test_another_demo_model_makes_the_inits_and_the_runs_from_them_again"
HEADLINE = "tests/test_experiments.py::test_headline_runs_quick"
PLOT_SERIES = "tests/test_experiments.py::test_plot_series_reads_every_line_keeps_a_steps_last_value_and_orders_by_step"


def mutant(name, file, original, mutated, tests):
    return dict(name=name, file=file, original=original, mutated=mutated, tests=tests)


MUTANTS = [
    # the table of issue 16: bugs that passed every test before
    mutant("collate_mask_shifted", "train_grpo.py",
           "completion_mask[row, begin:end] = 1",
           "completion_mask[row, begin - 1:end - 1] = 1",
           [GRPO + "test_collate_marks_the_completion_and_its_stop_token_only"]),
    mutant("trainer_logprobs_without_temperature", "train_grpo.py",
           "result = training_logprobs(wrapped, batch, rows, config.temperature, return_entropy=wants_entropy,",
           "result = training_logprobs(wrapped, batch, rows, 1.0, return_entropy=wants_entropy,",
           [TEMPERATURE]),
    mutant("forward_logprob_path_drops_temperature", "model.py",
           "flat_targets[rows], temperature=temperature,",
           "flat_targets[rows], temperature=1.0,",
           [MODEL + "test_logprob_path_matches_transformers_at_a_temperature", TEMPERATURE]),
    mutant("kl_policy_and_reference_swapped", "train_grpo.py",
           "kl = kl_estimate(logprobs, batch.ref_logprobs[rows], config.kl_estimator",
           "kl = kl_estimate(batch.ref_logprobs[rows], logprobs, config.kl_estimator",
           [WIRING]),
    mutant("batch_std_population", "train_grpo.py",
           "** 2).sum().item(), device) / max(count - 1, 1))",
           "** 2).sum().item(), device) / max(count, 1))",
           [WIRING]),
    mutant("resume_starts_from_scratch", "common.py",
           "    path = latest_checkpoint(config.out_dir, verbose=rank == 0)\n",
           "    path = None\n",
           [GRPO + "test_resume_continues_from_the_last_checkpoint",
            SFT + "test_resume_gives_the_same_weights_as_a_straight_run"]),
    mutant("rollout_seed_relative_to_start_step", "train_grpo.py",
           "seed=config.seed * 1_000_003 + step * 101 + rounds * 13 + rank)",
           "seed=config.seed * 1_000_003 + (step - start_step) * 101 + rounds * 13 + rank)",
           [GRPO + "test_resume_continues_from_the_last_checkpoint"]),
    mutant("generate_ignores_top_p", "sampler.py",
           "sample_next(logits, temperature, top_k, top_p, None, logprobs_mode,",
           "sample_next(logits, temperature, top_k, 1.0, None, logprobs_mode,",
           [FREQUENCIES]),
    mutant("sibling_copies_the_first_prompt_block", "sampler.py",
           "source = active[members[0]].blocks[-1]", "source = active[members[0]].blocks[0]",
           [SAMPLER + "test_cached_decode_equals_full_recomputation"]),
    mutant("resumed_sequence_drops_a_token", "sampler.py",
           "+ done[:-1] if resumed", "+ done[:-2] if resumed",
           [SAMPLER + "test_preempted_sequences_resume_with_the_same_stream"]),
    mutant("shared_prompt_blocks_not_referenced", "sampler.py",
           "                if k:\n                    self.pool.share(shared)\n", "",
           [SAMPLER + "test_preempted_sequences_resume_with_the_same_stream"]),
    mutant("compacted_sequence_moves_without_its_cache", "sampler.py",
           "                cache.copy_blocks(*(torch.tensor(blocks, device=device) for blocks in zip(*moves)))\n",
           "                pass\n",
           [SAMPLER + "test_finished_sequences_holes_are_filled_so_decoding_reads_views"]),
    mutant("kv_cache_copies_keys_only", "model.py",
           "self.keys_values.index_copy_(2, targets, self.keys_values.index_select(2, sources))",
           "self.keys_values[:1].index_copy_(2, targets, self.keys_values[:1].index_select(2, sources))",
           [SAMPLER + "test_cached_decode_equals_full_recomputation"]),
    mutant("tied_lm_head_left_row_major_while_sampling", "sampler.py",
           "list({id(w): w for w in weights + [model.lm_head_weight]}.values())", "weights",
           [COLUMN_MAJOR]),
    mutant("projections_left_column_major_after_a_failure", "sampler.py",
           "        yield\n    finally:\n", "        yield\n    except BaseException:\n        raise\n    else:\n",
           [COLUMN_MAJOR]),
    mutant("projections_restored_as_inference_tensors", "sampler.py",
           "    finally:\n        with torch.inference_mode(False), torch.no_grad():",
           "    finally:\n        with torch.no_grad():",
           [COLUMN_MAJOR]),
    mutant("column_major_projections_at_any_batch", "sampler.py",
           "slots <= COLUMN_MAJOR_MAX_SEQUENCES", "slots > 0",
           [COLUMN_MAJOR]),
    mutant("column_major_projections_for_short_calls", "sampler.py",
           "max_new_tokens >= COLUMN_MAJOR_MIN_NEW_TOKENS", "max_new_tokens >= 0",
           [COLUMN_MAJOR]),
    mutant("decode_rows_in_slot_order_after_compaction", "sampler.py",
           "sorted(self.active, key=by_first_block)", "sorted(self.active)",
           [SAMPLER + "test_finished_sequences_holes_are_filled_so_decoding_reads_views"]),
    mutant("one_block_prefix_reads_the_last_table_column", "model.py",
           "blocks = self.block_table[:, 0]", "blocks = self.block_table[:, -1]",
           [SAMPLER + "test_cached_decode_equals_full_recomputation",
            SAMPLER + "test_random_cache_settings_give_the_streams_of_a_roomy_cache"]),
    mutant("packed_prefill_writes_at_the_first_block", "model.py",
           "self.blocks = self.block_table[self.token_rows, self.positions[0] // block_size][None]",
           "self.blocks = self.block_table[self.token_rows, 0][None]",
           [SAMPLER + "test_cached_decode_equals_full_recomputation"]),
    mutant("uniform_ignores_the_position", "sampler.py",
           "bits = mix32(mix32(keys[:, 0] ^ (counters & MASK32)) ^ keys[:, 1])",
           "bits = mix32(mix32(keys[:, 0]) ^ keys[:, 1])",
           [SAMPLER + "test_counter_uniform_is_the_documented_hash_and_uniform"]),
    mutant("decode_kernel_offset_within_its_tile", "kernels/decode_attention.py",
           "in_block = offs_n % block_size", "in_block = offs_n % BLOCK_N",
           ["tests/test_decode_attention.py::test_triton_matches_reference_in_float64"]),
    mutant("rope_cache_kernel_block_of_position_zero", "kernels/rope_cache.py",
           "tl.load(BLOCK_TABLE + seq * stride_table + position // block_size)",
           "tl.load(BLOCK_TABLE + seq * stride_table)",
           ["tests/test_rope_cache.py::test_triton_matches_reference_in_float64"]),
    mutant("dynamic_sampling_keeps_equal_groups", "train_grpo.py",
           "has_signal = max(s.reward for s in group) > min(s.reward for s in group)",
           "has_signal = max(s.reward for s in group) >= min(s.reward for s in group)",
           [GRPO + "test_dynamic_sampling_keeps_the_informative_groups_and_stops_when_full"]),
    # the table's bugs that were caught already
    mutant("group_std_population", "train_grpo.py",
           "centred = centred / (grouped.std(dim=1, keepdim=True) + eps)",
           "centred = centred / (grouped.std(dim=1, keepdim=True, unbiased=False) + eps)",
           [GRPO + "test_group_advantages_hand_example", WIRING]),
    mutant("kl_forward_weight_inverted", "train_grpo.py",
           "weight = torch.exp(-log_ratio)  # ref / pi",
           "weight = torch.exp(log_ratio)  # ref / pi",
           [GRPO + "test_expected_gradient_of_each_kl_estimator_in_the_loss"]),
    mutant("optimizer_not_restored", "common.py",
           '        optimizer.load_state_dict(state["optimizer"])\n',
           "        pass\n",
           [SFT + "test_resume_gives_the_same_weights_as_a_straight_run"]),
    mutant("reference_not_restored", "train_grpo.py",
           'saved = os.path.join(resume_from, "reference") if resume_from else None',
           "saved = None",
           [GRPO + "test_resume_continues_from_the_last_checkpoint"]),
    mutant("world_size_scaling_dropped", "train_grpo.py",
           "(loss * world_size).backward()",
           "loss.backward()",
           [GRPO + "test_two_processes_give_the_same_update_as_one"]),
    mutant("decode_key_lengths_off_by_one", "model.py",
           "cache.lengths = cache.positions[:, 0] + 1",
           "cache.lengths = cache.positions[:, 0]",
           [SAMPLER + "test_cached_decode_equals_full_recomputation"]),
    mutant("logprob_backward_without_inverse_temperature", "kernels/logprob.py",
           "dz = dz.div_(temperature).to(hidden.dtype)",
           "dz = dz.to(hidden.dtype)",
           ["tests/test_logprob.py::test_triton_matches_naive"]),
    # the FSDP path of issue 16
    mutant("fsdp_rollout_copy_gathered_on_rank_0_only", "common.py",
           "weights = full_state_dict(model, next(model.parameters()).device, dtype=dtype)",
           "weights = full_state_dict(model, rank0_only=True)",
           [SFT_FSDP]),
    mutant("fsdp_optimizer_state_not_broadcast", "common.py",
           "options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))",
           "options=StateDictOptions(full_state_dict=True))",
           [SFT_FSDP]),
    mutant("reference_never_refreshed", "train_grpo.py",
           "config.ref_update_every and (step + 1) % config.ref_update_every == 0:",
           "config.ref_update_every and (step + 1) % config.ref_update_every == -1:",
           [GRPO_FSDP]),
    # others
    mutant("advantages_of_the_wrong_rows", "train_grpo.py",
           "batch.advantages[rows], mask,",
           "batch.advantages[: config.micro_batch_size], mask,",
           [WIRING]),
    mutant("reference_logprobs_without_temperature", "train_grpo.py",
           "batch.ref_logprobs = training_logprobs(ref_model, batch, slice(None), config.temperature)",
           "batch.ref_logprobs = training_logprobs(ref_model, batch, slice(None), 1.0)",
           [WIRING]),
    mutant("targets_not_shifted", "model.py",
           "targets[:, :-1] = input_ids[:, 1:]  # position t predicts token t + 1",
           "targets[:, :-1] = input_ids[:, :-1]  # position t predicts token t + 1",
           [MODEL + "test_sequence_logprobs_are_transformers_next_token_log_probs", TEMPERATURE]),
    mutant("generate_ignores_top_k", "sampler.py",
           "sample_next(logits, temperature, top_k, top_p, None, logprobs_mode,",
           "sample_next(logits, temperature, 0, top_p, None, logprobs_mode,",
           [FREQUENCIES]),
    mutant("generate_ignores_temperature", "sampler.py",
           "sample_next(logits, temperature, top_k, top_p, None, logprobs_mode,",
           "sample_next(logits, 1.0 if temperature else 0, top_k, top_p, None, logprobs_mode,",
           [FREQUENCIES]),
    mutant("sft_world_size_scaling_dropped", "train_sft.py",
           "(token_loss * world_size / global_tokens).backward()",
           "(token_loss / global_tokens).backward()",
           [SFT + "test_two_process_ddp_equals_one_process"]),
    mutant("sft_data_position_relative_to_start_step", "train_sft.py",
           "indices = step_examples(step, config.batch_size,",
           "indices = step_examples(step - start_step, config.batch_size,",
           [SFT + "test_resume_gives_the_same_weights_as_a_straight_run"]),
    mutant("sft_stop_token_not_learned", "data.py",
           "loss_mask = [0] * len(prompt_ids) + [1] * (len(completion_ids) + len(end_ids))",
           "loss_mask = [0] * len(prompt_ids) + [1] * len(completion_ids) + [0] * len(end_ids)",
           [SFT + "test_loss_mask_covers_completion_tokens_only", SFT + "test_jsonl_formats_train"]),
    mutant("seq_mean_over_padded_length", "train_grpo.py",
           "per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)",
           "per_sequence = (per_token * mask).sum(1) / mask.shape[1]",
           [GRPO + "test_policy_loss_matches_per_token_loop"]),
    mutant("empty_rank_backward_without_forward", "train_grpo.py",
           "(sequence_logprobs(wrapped, torch.zeros((1, 2), dtype=torch.long, device=device)).sum() * 0).backward()",
           "(sum(p.sum() for p in model.parameters()) * 0).backward()",
           [GRPO + "test_a_rank_left_without_rollouts_joins_the_update"]),
    mutant("sequence_count_of_this_rank_only", "train_grpo.py",
           "num_sequences = all_reduce_sum(len(samples), device)",
           "num_sequences = len(samples)",
           [GRPO + "test_two_processes_give_the_same_update_as_one"]),
    mutant("token_count_of_this_rank_only", "train_grpo.py",
           "num_tokens = all_reduce_sum(float(batch.completion_mask.sum()) if samples else 0.0, device)",
           "num_tokens = float(batch.completion_mask.sum()) if samples else 0.0",
           [GRPO + "test_two_processes_give_the_same_update_as_one"]),
    mutant("warmup_off_by_one", "common.py",
           "return lr * (step + 1) / warmup_steps",
           "return lr * step / warmup_steps",
           [SFT + "test_tiny_run_loss_falls_and_matches_golden_losses"]),
    # make_traces.py (issue 19)
    mutant("traces_store_the_hinted_prompt", "make_traces.py",
           "records[i].update(hinted_samples=n,", "records[i].update(prompt=hinted_messages[k], hinted_samples=n,",
           [TRACES + "test_hint_never_reaches_a_stored_prompt_and_leaks_and_wrong_answers_are_dropped"]),
    mutant("traces_keep_leaks", "make_traces.py",
           "return leak_reason(text, answer, problem, hint_template) if hint_template is not None else None",
           "return None",
           [TRACES + "test_hint_never_reaches_a_stored_prompt_and_leaks_and_wrong_answers_are_dropped"]),
    mutant("traces_keep_wrong_answers", "make_traces.py",
           "    if not verdict.correct:\n        return verdict.status",
           "    if not verdict.correct and False:\n        return verdict.status",
           [TRACES + "test_hint_never_reaches_a_stored_prompt_and_leaks_and_wrong_answers_are_dropped"]),
    mutant("traces_seed_by_rank_position", "make_traces.py",
           "seed=config.seed * 1_000_003 + 2 * c,", "seed=config.seed * 1_000_003 + 2 * k,",
           [TRACES + "test_resume_after_a_kill_gives_the_same_file_and_it_trains",
            TRACES + "test_two_processes_equal_one"]),
    mutant("traces_redo_finished_chunks", "make_traces.py",
           "if not finished[c]]", "]",
           [TRACES + "test_resume_after_a_kill_gives_the_same_file_and_it_trains"]),
    mutant("traces_early_answer_counts_results", "make_traces.py",
           '    return re.sub(r"=\\s*\\S+", "=", opening)', "    return opening",
           [TRACES + "test_rejection_reasons"]),
    # tasks.py and the loss-position log-probs (issues 17 and 18)
    mutant("prompt_ignores_the_instruction_flag", "tasks.py",
           "self.instruction if instruction is None else instruction)", "self.instruction)", [PROMPT]),
    mutant("prompt_ignores_the_tasks_instruction", "tasks.py",
           "self.instruction if instruction is None else instruction)", "instruction)", [PROMPT]),
    mutant("check_problems_leaves_ids_unset", "tasks.py",
           "return [dict(p, id=i) for p, i in zip(problems, ids)]", "return problems",
           [TASKS + "test_problems_of_a_users_task_are_checked_with_their_index"]),
    mutant("score_drops_the_format_reward", "tasks.py",
           "rewards = [r + format_weight * format_reward(c) for r, c in zip(rewards, completions)]",
           "rewards = [r for r, c in zip(rewards, completions)]", [SCORE]),
    mutant("score_drops_the_overlong_penalty", "tasks.py",
           "rewards = [r + p for r, p in zip(rewards, penalties)]", "rewards = [r for r, p in zip(rewards, penalties)]",
           [SCORE]),
    mutant("score_ignores_the_tasks_reward", "tasks.py",
           "rewards = [task.reward(c, p, v) for c, p, v in zip(completions, problems, verdicts)]",
           "rewards = [float(v.correct) for c, p, v in zip(completions, problems, verdicts)]", [SCORE]),
    mutant("jsonl_answer_keeps_the_working", "tasks.py",
           'answer = answer.split("####")[-1].strip()', 'answer = answer.split("####")[0].strip()',
           [TASKS + "test_get_task_resolves_every_kind_of_name"]),
    mutant("demo_task_ignores_its_size", "tasks.py",
           "return DemoTask(test_size=demo_problems)", "return DemoTask()",
           [TASKS + "test_get_task_resolves_every_kind_of_name"]),
    mutant("jsonl_task_needs_the_extension", "tasks.py",
           'if spec.endswith(".jsonl") or os.path.exists(spec):', 'if spec.endswith(".jsonl"):',
           [TASKS + "test_get_task_resolves_every_kind_of_name"]),
    mutant("evaluate_grades_against_the_wrong_problems", "tasks.py",
           "verdicts = task.grade(texts, [batch[c.prompt_index] for c in completions])",
           "verdicts = task.grade(texts, [problems[c.prompt_index] for c in completions])",
           [TASKS + "test_evaluate_grades_each_completion_against_its_own_problem"]),
    mutant("heldout_not_cut_to_eval_problems", "train_grpo.py",
           "check_problems(eval_task.test_problems(), eval_task)[: config.eval_problems]",
           "check_problems(eval_task.test_problems(), eval_task)",
           [TASKS + "test_grpo_evaluates_the_first_eval_problems_of_the_held_out_task"]),
    mutant("packed_logprobs_put_back_column_major", "train_grpo.py",
           "return packed.new_zeros(input_ids.shape).masked_scatter(real, packed[0])",
           "return packed.new_zeros(input_ids.shape).T.masked_scatter(real.T, packed[0]).T",
           [GRPO + "test_packed_and_shared_prompt_training_passes_equal_padded_ones"]),
    mutant("empty_rank_skips_the_batch_std_all_reduce", "train_grpo.py",
           '    if config.scale_rewards == "batch":\n        count = all_reduce_sum(len(rewards), device)',
           '    if config.scale_rewards == "batch" and batch is not None:\n        count = all_reduce_sum(len(rewards), device)',
           [GRPO + "test_a_rank_left_without_rollouts_joins_the_update"]),
    mutant("loss_mask_shifted", "model.py",
           "~loss_mask[:, 1:].bool()", "~loss_mask[:, :-1].bool()",
           [MODEL + "test_a_loss_mask_scores_only_its_tokens_with_the_same_values_and_gradients"]),
    mutant("pi_old_is_the_current_policy_in_every_epoch", "train_grpo.py",
           "old = batch.old_logprobs[rows] if config.mu > 1 else logprobs.detach()",
           "old = logprobs.detach()",
           [GRPO + "test_mu_two_keeps_pi_old_fixed_and_counts_clips_per_token_and_epoch"]),
    mutant("logged_means_of_this_rank_only", "train_grpo.py",
           "totals = {k: all_reduce_sum(v, device) for k, v in stats.items() if k != \"ratio_max_dev\"}",
           "totals = {k: v for k, v in stats.items() if k != \"ratio_max_dev\"}",
           [GRPO + "test_two_processes_give_the_same_update_as_one"]),
    mutant("clip_fraction_not_per_epoch", "train_grpo.py",
           "clip_low=totals[\"clip_low\"] / max(num_tokens * config.mu, 1),",
           "clip_low=totals[\"clip_low\"] / max(num_tokens, 1),",
           [GRPO + "test_mu_two_keeps_pi_old_fixed_and_counts_clips_per_token_and_epoch"]),
    # the fused layer kernels (issue 21): forward and backward against float64 formulas
    mutant("silu_backward_drops_the_sigmoid_derivative", "kernels/silu_mul.py",
           "d_gate = d_out * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))",
           "d_gate = d_out * up * sigmoid",
           ["tests/test_silu_mul.py::test_triton_forward_and_backward_match_float64"]),
    mutant("add_rms_norm_drops_eps", "kernels/add_rms_norm.py",
           "rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)",
           "rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols)",
           ["tests/test_add_rms_norm.py::test_triton_forward_and_backward_match_float64"]),
    mutant("add_rms_norm_backward_drops_the_residual_gradient", "kernels/add_rms_norm.py",
           "d_h += tl.load(D_H_OUT + row * stride_dh_out + cols, mask=ok, other=0.0).to(tl.float32)",
           "d_h += 0.0",
           ["tests/test_add_rms_norm.py::test_triton_forward_and_backward_match_float64"]),
    mutant("add_rms_norm_backward_forgets_the_mean_term", "kernels/add_rms_norm.py",
           "d_h = rstd * (weighted - h_hat * (tl.sum(h_hat * weighted, axis=0) / n_cols))",
           "d_h = rstd * weighted",
           ["tests/test_add_rms_norm.py::test_triton_forward_and_backward_match_float64"]),
    mutant("block_skips_the_attention_residual", "model.py",
           "x, normed = add_then_norm(x, attended, self.post_attention_layernorm)",
           "_, normed = add_then_norm(x, attended, self.post_attention_layernorm)",
           [MODEL + "test_logits_match_transformers"]),
    mutant("final_norm_drops_the_last_mlp_output", "model.py",
           "_, x = add_then_norm(x, delta, self.model.norm)",
           "x = self.model.norm(x)",
           [MODEL + "test_logits_match_transformers"]),
    # shared prompts in the training passes (issue 18): each group's prompt once, its completions reading its keys
    mutant("completions_see_a_key_past_their_prompt", "model.py",
           "prompt_visible = torch.arange(Tp, device=device) < starts[:, None]",
           "prompt_visible = torch.arange(Tp, device=device) <= starts[:, None]",
           [SHARED_PROMPTS]),
    mutant("first_completion_token_predicted_from_the_wrong_prompt_position", "model.py",
           "prompt_at[prompt_index, prompt_lengths[prompt_index] - 1]",
           "prompt_at[prompt_index, prompt_lengths[prompt_index] - 2]",
           [SHARED_PROMPTS]),
    mutant("completion_positions_start_one_late", "model.py",
           "(starts[:, None] + steps)[self.completion_real]])[None]",
           "(starts[:, None] + steps + 1)[self.completion_real]])[None]",
           [SHARED_PROMPTS]),
    # completions attend in buckets of similar length, laid out in the row longest first
    mutant("completion_buckets_shortest_first", "model.py",
           "by_length = completion_lengths.argsort(descending=True, stable=True)",
           "by_length = completion_lengths.argsort(descending=False, stable=True)",
           [SHARED_PROMPTS]),
    mutant("bucket_width_from_its_shortest_completion", "model.py",
           "self.buckets.append((rows, int(lengths[first]), int(lengths[rows].sum())))",
           "self.buckets.append((rows, int(lengths[rows][-1]), int(lengths[rows].sum())))",
           [SHARED_PROMPTS]),
    mutant("sorted_completions_read_the_unsorted_prompts", "model.py",
           "lengths, self.prompt_index = completion_lengths[by_length], prompt_index[by_length]",
           "lengths, self.prompt_index = completion_lengths[by_length], prompt_index",
           [SHARED_PROMPTS]),
    mutant("predictors_in_the_sorted_order", "model.py",
           "completion_at[by_length] = (self.completion_real.flatten().cumsum(0) - 1)",
           "completion_at[:] = (self.completion_real.flatten().cumsum(0) - 1)",
           [SHARED_PROMPTS]),
    mutant("prompts_of_one_length_shared", "model.py",
           "new_prompt[1:] = (prompt_part[1:] != prompt_part[:-1]).any(1)",
           "new_prompt[1:] = prompt_lengths[1:] != prompt_lengths[:-1]",
           [SHARED_PROMPTS]),
    mutant("auto_layout_never_shares_prompts", "train_grpo.py",
           "share_prompts = device.type == \"cpu\" and config.pack != \"true\"",
           "share_prompts = device.type == \"cuda\" and config.pack != \"true\"",
           [GRPO + "test_auto_layout_shares_prompts_on_the_cpu_and_one_layout_at_a_time"]),
    mutant("exact_kl_always_reverse", "model.py",
           "ref_weight, temperature,\n                               direction),)",
           "ref_weight, temperature,\n                               \"reverse\"),)",
           [GRPO + "test_exact_kl_comes_from_the_log_prob_forward_and_matches_the_definition"]),
    mutant("exact_kl_reference_states_from_the_policy", "model.py",
           "reference = (kl_reference.hidden_states(input_ids,",
           "reference = (self.hidden_states(input_ids,",
           [GRPO + "test_exact_kl_comes_from_the_log_prob_forward_and_matches_the_definition"]),
    mutant("exact_kl_at_the_wrong_temperature", "model.py",
           "ref_weight, temperature,\n                               direction),)",
           "ref_weight, 1.0,\n                               direction),)",
           [GRPO + "test_exact_kl_comes_from_the_log_prob_forward_and_matches_the_definition"]),
    mutant("exact_kl_in_the_loss_drops_the_direction", "train_grpo.py",
           "kl_reference=ref_model if exact else None, kl_direction=config.kl_direction)",
           "kl_reference=ref_model if exact else None)",
           [GRPO + "test_main_wires_the_exact_kl_from_the_reference_into_the_loss_or_the_reward"]),
    mutant("exact_kl_taken_as_the_entropy", "train_grpo.py",
           "entropy = rest.pop(0) if wants_entropy else None",
           "entropy = rest.pop(-1) if wants_entropy else None",
           [GRPO + "test_main_wires_the_exact_kl_from_the_reference_into_the_loss_or_the_reward"]),
    mutant("exact_kl_in_the_reward_against_the_policy", "train_grpo.py",
           "kl_reference=ref_model if exact else None,\n",
           "kl_reference=model if exact else None,\n",
           [GRPO + "test_main_wires_the_exact_kl_from_the_reference_into_the_loss_or_the_reward"]),
    mutant("entropy_in_every_epoch", "train_grpo.py",
           "wants_entropy = diagnostics or config.entropy_coef > 0",
           "wants_entropy = True",
           [GRPO + "test_entropy_is_computed_where_it_is_logged_or_trained_on"]),
    # the verifier's fixes of 2026-12-01 (a cold read found each wrong verdict)
    mutant("percentage_against_a_percentage", "verifier.py",
           "if gold_is_percent != answer_is_percent and (a == g / 100",
           "if (a == g / 100",
           [VERIFIER_CASES]),
    mutant("bare_list_unordered_against_a_tuple", "verifier.py",
           'return values_equal(("tuple", answer[1]), gold)',
           'return values_equal(("set", answer[1]), ("set", gold[1]))',
           [VERIFIER_CASES]),
    mutant("halves_rounded_to_even", "verifier.py",
           "rounded = Fraction(math.floor(abs(value) * scale + Fraction(1, 2)), scale)",
           "rounded = round(abs(value), places)",
           [VERIFIER_CASES]),
    mutant("spaces_join_two_numbers", "verifier.py",
           'r"(?<=[\\d,]) (?=\\d{3}(?!\\d))", "", s)',
           'r" ", "", s)',
           [VERIFIER_CASES]),
    mutant("digits_side_by_side_left_to_sympy", "verifier.py",
           'return Verdict("incorrect", answer, "not one number") if _DIGITS_AND_SPACES.fullmatch(answer) else None',
           "return None",
           [VERIFIER_CASES]),
    mutant("spaced_minus_kept", "verifier.py",
           's = re.sub(r"^-\\s+", "-", s.strip())',
           "s = s.strip()",
           [VERIFIER_CASES]),
    mutant("union_parts_in_order", "verifier.py",
           'if kind in ("set", "union") and answer[0] == kind:',
           'if kind == "set" and answer[0] == kind:',
           [VERIFIER_CASES]),
    mutant("brace_map_pairs_the_first_open_brace", "verifier.py",
           "closing[open_braces.pop()] = match.end()",
           "closing[open_braces.pop(0)] = match.end()",
           ["tests/test_verifier.py::test_boxed_spans_match_each_box_by_its_own_brace_scan_on_random_text"]),
    # a decimal gold: an answer that rounds to it at its places is right, on the exact path as on the sympy path
    mutant("answer_not_rounded_to_a_decimal_gold", "verifier.py",
           "if places is not None and round_half_up(a, places) == g:",
           "if places is not None and a == g:",
           [VERIFIER_CASES]),
    # eval scores (mutation audit of eval.py, tasks.metrics and plot.py): each reported number against an
    # independent computation
    mutant("maj_at_n_counts_any_correct_sample", "tasks.py",
           'v["status"] == "correct"\n',
           'any(s["status"] == "correct" for s in r["samples"])\n',
           [EVAL_TESTS + "test_metrics_equal_a_brute_force_count_on_random_records"]),
    mutant("truncated_share_per_problem", "tasks.py",
           'for r in records for s in r["samples"]) / len(lengths)}',
           'for r in records for s in r["samples"]) / len(records)}',
           [EVAL_TESTS + "test_metrics_equal_a_brute_force_count_on_random_records"]),
    mutant("truncated_counts_stopped_samples", "tasks.py",
           's["finish"] == "length" for r', 's["finish"] == "stop" for r',
           [EVAL_TESTS + "test_metrics_equal_a_brute_force_count_on_random_records"]),
    mutant("evaluate_samples_window_not_per_problem", "tasks.py",
           "for j in range(i * n, (i + 1) * n)]", "for j in range(i, i + n)]",
           [TASKS + "test_evaluate_keeps_each_problems_own_samples_in_order"]),
    mutant("combined_score_of_maj_at_n", "eval.py",
           'score = combined_score({name: m["pass@1"]', 'score = combined_score({name: m[f"maj@{m[\'n\']}"]',
           [EVAL_REPORTS]),
    mutant("table_difference_to_deepseek_reversed", "eval.py",
           "f\"{scores['pass@1'] - DEEPSEEK_V3[name]:+.1f}\"",
           "f\"{DEEPSEEK_V3[name] - scores['pass@1']:+.1f}\"",
           [EVAL_REPORTS]),
    mutant("table_without_maj_columns", "eval.py",
           'k.startswith(("maj@", "pass@"))', 'k.startswith(("pass@",))',
           [EVAL_REPORTS]),
    mutant("eval_metrics_of_one_sample", "eval.py",
           "results[name] = metrics(records, config.n)", "results[name] = metrics(records, 1)",
           [EVAL_REPORTS]),
    mutant("metrics_jsonl_keys_without_benchmark", "eval.py",
           'scores = {f"{name}/{key}": value', 'scores = {f"{key}": value',
           [EVAL_REPORTS]),
    mutant("metrics_jsonl_without_combined_score", "eval.py",
           "write(step=0, combined_score=score,", "write(step=0, combined_score=None,",
           [EVAL_REPORTS]),
    mutant("combined_score_includes_partial_benchmarks", "eval.py",
           'for name, m in results.items() if not m.get("partial")})', "for name, m in results.items()})",
           [EVAL_COMBINED]),
    mutant("experiment_cache_ignores_its_inputs", "experiments/harness.py",
           'if cached.get("key") != json.loads(json.dumps(key)):', "if False:",
           [EXPERIMENT_CACHE]),
    mutant("rerun_remakes_a_run_twice_in_one_invocation", "experiments/harness.py",
           "if (self.args.rerun and run_dir not in self.made) or", "if self.args.rerun or",
           [EXPERIMENT_CACHE]),
    mutant("experiment_init_kept_whatever_the_demo_model", "experiments/harness.py",
           'self.cached_step("init", seed, build, key=dict(model=DEMO_MODEL))',
           'self.cached_step("init", seed, build, key=None)',
           [EXPERIMENT_INIT]),
    mutant("made_stamps_miss_a_run_named_by_its_own_folder", "experiments/harness.py",
           "for run_dir in (value, folder, os.path.dirname(folder)):",
           "for run_dir in (folder, os.path.dirname(folder)):",
           [EXPERIMENT_INIT]),
    mutant("headline_reads_back_a_seed_of_other_inputs", "experiments/headline.py",
           'if result.get("inputs") == inputs(quick):', 'if "inputs" in result:',
           [HEADLINE]),
    mutant("partial_benchmark_compared_to_deepseek", "eval.py",
           'else "partial" if scores.get("partial") else', "else",
           [EVAL_COMBINED]),
    mutant("completions_of_every_problem_marked_partial", "eval.py",
           "if len(records) < len(problems[name]):", "if len(records) <= len(problems[name]):",
           [EVAL_COMBINED]),
    mutant("completions_uneven_sample_counts_accepted", "eval.py",
           "if len(counts) > 1:", "if len(counts) > 2:",
           [EVAL_COMBINED]),
    mutant("math_verify_pass_at_1_as_a_fraction", "eval.py",
           "return 100 * sum(correct) / len(correct)", "return sum(correct) / len(correct)",
           [EVAL_TESTS + "test_math_verify_pass_at_1_is_the_mean_share_of_verified_samples_in_percent",
            EVAL_COMBINED]),
    mutant("math_verify_pass_at_1_counts_samples", "eval.py",
           'for s in record["samples"]) / len(record["samples"]))', 'for s in record["samples"]))',
           [EVAL_TESTS + "test_math_verify_pass_at_1_is_the_mean_share_of_verified_samples_in_percent",
            EVAL_COMBINED]),
    mutant("completions_length_ignored", "eval.py",
           'length=row.get("length", len(text))', "length=len(text)",
           [EVAL_COMPLETIONS]),
    mutant("completions_finish_ignored", "eval.py",
           'finish=row.get("finish", "stop")', 'finish="stop"',
           [EVAL_COMPLETIONS]),
    mutant("completions_id_ignores_the_benchmark_field", "eval.py",
           'and row.get("benchmark") in (None, name)]', "]",
           [EVAL_COMPLETIONS]),
    mutant("completions_ignore_the_limit", "eval.py",
           "problems = {name: check_problems(task.test_problems(), task)[: config.limit]",
           "problems = {name: check_problems(task.test_problems(), task)",
           [EVAL_COMPLETIONS]),
    mutant("length_plot_accuracy_of_answered_samples", "eval.py",
           'samples = sorted((s["length"], s["status"] == "correct")',
           'samples = sorted((s["length"], s["status"] != "no_answer")',
           [EVAL_TESTS + "test_accuracy_vs_length_plots_the_share_of_correct_samples_per_length_bin"]),
    mutant("plot_drops_the_last_line", "plot.py",
           "        for line in f:\n            try:", "        for line in list(f)[:-1]:\n            try:",
           [PLOT_SERIES]),
    mutant("plot_step_keeps_its_first_value", "plot.py",
           "points[step] = float(value)", "points.setdefault(step, float(value))",
           [PLOT_SERIES]),
    mutant("plot_series_in_file_order", "plot.py",
           "return sorted(points.items())", "return list(points.items())",
           [PLOT_SERIES]),
    mutant("plot_keeps_nan", "plot.py",
           "and math.isfinite(value):", ":",
           [PLOT_SERIES]),
]


def scratch_copy():
    """The working tree (tracked and untracked files, not .git, the virtualenv or outputs) in a temporary folder."""
    target = tempfile.mkdtemp(prefix="mutants_")
    ignore = shutil.ignore_patterns(".git", ".venv", "out", "__pycache__", ".pytest_cache", "*.tmp")
    shutil.copytree(ROOT, target, ignore=ignore, dirs_exist_ok=True)
    return target


def run_tests(copy, tests, timeout):
    """True when the tests pass. A hang past the timeout counts as a failure (the suite would not finish)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    return result.returncode == 0, (result.stdout.strip().splitlines() or [""])[-1]


def apply(copy, m):
    path = os.path.join(copy, m["file"])
    with open(path) as f:
        source = f.read()
    if source.count(m["original"]) != 1:
        raise SystemExit(f"mutant {m['name']}: its original text occurs {source.count(m['original'])} times in "
                         f"{m['file']} (it must occur once): update it in bench/mutants.py")
    with open(path, "w") as f:
        f.write(source.replace(m["original"], m["mutated"]))
    return source


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's tests")
    args = parser.parse_args()
    unknown = set(args.names) - {m["name"] for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants {sorted(unknown)}; --list shows them")
    chosen = [m for m in MUTANTS if not args.names or m["name"] in args.names]
    if args.list:
        for m in chosen:
            print(f"{m['name']:48s} {m['file']:20s} {' '.join(t.split('::')[-1] for t in m['tests'])}")
        return
    copy = scratch_copy()
    try:
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m["tests"]})
            passed, summary = run_tests(copy, tests, args.timeout * 2)
            print(f"baseline, unmutated: {summary}", flush=True)
            if not passed:
                raise SystemExit("the unmutated copy fails these tests: fix that first")
        survivors = []
        for m in chosen:
            start = time.time()
            original = apply(copy, m)
            try:
                passed, summary = run_tests(copy, m["tests"], args.timeout)
            finally:
                with open(os.path.join(copy, m["file"]), "w") as f:
                    f.write(original)
            print(f"{'SURVIVED' if passed else 'caught  '} {m['name']:48s} {time.time() - start:5.0f} s | {summary}",
                  flush=True)
            if passed:
                survivors.append(m["name"])
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants caught"
          + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
