# python -m pytest tests/test_make_traces.py -q
import json
import os
import subprocess
import sys

import pytest
import torch

import make_traces
import train_sft
from conftest import ROOT
from data import Tokenizer
from tasks import build_demo_tokenizer
from make_traces import rejection_reason
from model import ModelConfig, Transformer, init_weights, sequence_logprobs
from sampler import Completion
from verifier import grade


def trace(steps, answer):
    return "<think>\n" + steps + "\n</think>\n\n\\boxed{" + answer + "}"


# (problem, gold, what the teacher writes without the hint (one of them at random), and with it)
TEACHER = [
    ("Ava has 3 pens. Then Ava gets 2 more. How many pens does Ava have now?", "5",  # solved
     [trace("3 + 2 = 5", "5"), trace("Ava has 3 pens.\n3 + 2 = 5", "5")], [trace("3 + 2 = 5", "5")]),
    ("Ben has 4 eggs. Then Ben doubles them. How many eggs does Ben have now?", "8",  # solved with the hint only
     [trace("4 * 2 = 9", "9")], [trace("4 * 2 = 8", "8")]),
    ("Cleo has 5 cards. Then Cleo gets 2 more. How many cards does Cleo have now?", "7",  # says it was given it
     [trace("5 + 2 = 6", "6")], [trace("I was given the answer 7.\n5 + 2 = 7", "7")]),
    ("Dan has 3 coins. Then Dan doubles them. How many coins does Dan have now?", "6",  # opens with the answer
     [trace("3 * 2 = 5", "5")], [trace("The answer is 6.\n3 * 2 = 6", "6")]),
    ("Eli has 9 shells. Then Eli loses 5. How many shells does Eli have now?", "4",  # wrong even with the hint
     [trace("9 - 5 = 3", "3")], [trace("9 - 5 = 3", "3")]),
    ("Fay has 6 books. Then Fay sells 3. How many books does Fay have now?", "3",  # a coin flip
     [trace("6 - 3 = 3", "3"), trace("6 - 3 = 2", "2")], [trace("6 - 3 = 3", "3")]),
]


HINT = "\nHint: {answer}."  # short, so the tiny teacher trains in seconds


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny model trained for a few seconds towards TEACHER's completions (it learns them only roughly, which
    is all the resume and multi-process tests need), and the problems file."""
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = build_demo_tokenizer(path)
    config = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=(tokenizer.vocab_size + 63) // 64 * 64,
                         hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, qkv_bias=True, torch_dtype="float32",
                         eos_token_id=tokenizer.eos_token_ids[0], tie_word_embeddings=True)
    model = init_weights(Transformer(config), seed=0)
    examples = []
    for problem, answer, plain, hinted in TEACHER:
        examples += [tokenizer.encode_chat([{"role": "user", "content": problem}], c) for c in plain]
        examples += [tokenizer.encode_chat([{"role": "user", "content": problem + HINT.format(answer=answer)}], c)
                     for c in hinted]
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.tensor([ids + [0] * (longest - len(ids)) for ids, _ in examples])  # (B, T)
    loss_mask = torch.tensor([mask + [0] * (longest - len(mask)) for _, mask in examples])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        loss = -(sequence_logprobs(model, input_ids) * loss_mask).sum() / loss_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    problems = tmp_path_factory.mktemp("data") / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a, _, _ in TEACHER))
    return str(path), str(problems)


def run(teacher, out_dir, *extra):
    path, problems = teacher
    return make_traces.main([f"--teacher={path}", f"--data={problems}", f"--out_dir={out_dir}", "--chunk=2",
                             "--max_new_tokens=24", f"--hint_template={HINT}"] + list(extra))


def rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "traces.jsonl"))]


@pytest.fixture
def scripted_teacher(teacher, monkeypatch):
    """The sampler replaced by a teacher that writes exactly TEACHER's completions: the plain ones in turn, the
    hinted ones only when its prompt carries the hint."""
    tokenizer = Tokenizer.from_pretrained(teacher[0])

    def generate(model, prompts, max_new_tokens, n=1, **_):
        completions = []
        for index, prompt in enumerate(prompts):
            text = tokenizer.decode(prompt)
            problem, answer, plain, hinted = next(t for t in TEACHER if t[0] in text)
            options = hinted if HINT.format(answer=answer) in text else plain
            for k in range(n):
                tokens = tokenizer.encode(options[k % len(options)]) + tokenizer.eos_token_ids[:1]
                completions.append(Completion(index, tokens, [0.0] * len(tokens), "stop"))
        return completions

    monkeypatch.setattr(make_traces, "generate", generate)
    return teacher


def by_problem(out_dir):
    return {row["prompt"]: row for row in rows(out_dir)}


def test_hint_never_reaches_a_stored_prompt_and_leaks_and_wrong_answers_are_dropped(scripted_teacher, tmp_path):
    summary = run(scripted_teacher, tmp_path)
    kept = by_problem(tmp_path)
    ava, ben, fay = TEACHER[0][0], TEACHER[1][0], TEACHER[5][0]
    assert set(kept) == {ava, ben, fay}  # Cleo leaks, Dan opens with the answer, Eli is wrong even with the hint
    assert kept[ben]["kind"] == "hinted" and kept[ben]["completion"] == trace("4 * 2 = 8", "8")
    assert kept[ben]["teacher_pass_rate"] == 0.0 and kept[ben]["hinted_pass_rate"] == 1.0
    assert kept[ava] == dict(kept[ava], kind="sampled", completion=trace("3 + 2 = 5", "5"), teacher_pass_rate=1.0)
    assert kept[fay]["completion"] == trace("6 - 3 = 3", "3") and kept[fay]["teacher_pass_rate"] == 0.5
    assert summary["rejected"]["hinted"] == {"leak_mention": 4, "leak_early_answer": 4, "incorrect": 4,
                                             "duplicate": 3}
    assert summary["kept"] == {"sampled": 2, "hinted": 1} and summary["teacher_pass@1"] == 25.0
    with open(tmp_path / "chunks" / "chunk_000000.json") as f:
        stored = json.dumps(json.load(f))
    for text in [row["prompt"] for row in rows(tmp_path)] + [stored]:
        assert "Hint" not in text


def test_hinted_problems_get_hint_samples_completions_and_their_pass_rate_counts_them(scripted_teacher, tmp_path):
    """--samples and --hint_samples differ here (every other test runs both at 4): each hinted problem is sampled
    --hint_samples times, and its pass rate and the summary's hinted pass@1 divide by that count."""
    summary = run(scripted_teacher, tmp_path, "--hint=always", "--samples=2", "--hint_samples=3")
    records = []
    for name in sorted(os.listdir(tmp_path / "chunks")):
        with open(tmp_path / "chunks" / name) as f:
            records += json.load(f)
    assert len(records) == len(TEACHER)
    assert all(r["samples"] == 2 and r["hinted_samples"] == 3 and len(r["hinted_lengths"]) == 3 for r in records)
    assert summary["hinted_pass@1"] == pytest.approx(100 * sum(r["hinted_correct"] / 3 for r in records) / len(records))
    assert any(r["hinted_correct"] == 3 for r in records)  # a problem solved every time with the hint: 1, not 3/2
    assert all(row["hinted_pass_rate"] <= 1.0 for row in rows(tmp_path))


def test_hint_always_keeps_only_hinted_traces_never_none_and_keep_two(scripted_teacher, tmp_path):
    run(scripted_teacher, tmp_path / "always", "--hint=always")
    kept = by_problem(tmp_path / "always")
    assert {row["kind"] for row in kept.values()} == {"hinted"} and len(kept) == 3
    assert kept[TEACHER[0][0]]["teacher_pass_rate"] == 1.0  # still measured without the hint
    run(scripted_teacher, tmp_path / "never", "--hint=never", "--keep=2")
    kept = rows(tmp_path / "never")
    assert [row["completion"] for row in kept] == [trace("3 + 2 = 5", "5"), trace("Ava has 3 pens.\n3 + 2 = 5", "5"),
                                                   trace("6 - 3 = 3", "3")]  # distinct, the shortest first


@pytest.mark.parametrize("text, finish, gold, problem, hinted, expected", [
    (trace("3 * 2 = 6", "6"), "stop", "6", "Dan has 3 coins.", True, None),  # derives it: a good faked trace
    (trace("3 * 2 = 6", "6"), "stop", "7", "Dan has 3 coins.", False, "incorrect"),
    (trace("3 * 2 = 6", "6"), "length", "6", "Dan has 3 coins.", False, "truncated"),
    ("3 * 2 = 6 so \\boxed{6}", "stop", "6", "Dan has 3 coins.", False, "layout"),  # no think block
    ("<think>\n3 * 2 = 6\n</think>\n\nIt is 6.", "stop", "6", "Dan has 3 coins.", False, "layout"),  # no box
    ("<think>\n3 * 2 = 6\n</think>\n\n\\boxed{6", "stop", "6", "Dan has 3 coins.", False, "layout"),  # open box
    (trace("The answer is 6.\n3 * 2 = 6", "6"), "stop", "6", "Dan has 3 coins.", False, None),  # not hinted
    (trace("The answer is 6.\n3 * 2 = 6", "6"), "stop", "6", "Dan has 3 coins.", True, "leak_early_answer"),
    (trace("We need 6 in the end.\n3 * 2 = 6", "6"), "stop", "6", "Dan has 3 coins.", True, "leak_early_answer"),
    (trace("Dan has 6 coins after doubling 3.", "6"), "stop", "6", "Dan has 3 coins.", True, "leak_early_answer"),
    (trace("Dan has 3 coins, 6 pens.\n3 * 2 = 6", "6"), "stop", "6", "Dan has 3 coins, 6 pens.", True, None),
    (trace("Start: 3.\n3 * 2 = 6", "6"), "stop", "6", "Dan has 3 coins.", True, None),  # 6 after the opening
    (trace("Start with 36 coins.\n36 / 6 = 6", "6"), "stop", "6", "x", True, None),  # 36 is not 6
    (trace("I was given the answer 6.\n3 * 2 = 6", "6"), "stop", "6", "x", True, "leak_mention"),
    (trace("3 * 2 = 6, which matches the hint.", "6"), "stop", "6", "x", True, "leak_mention"),
    (trace("3 * 2 = 6, as the problem says the answer is.", "6"), "stop", "6", "x", True, "leak_mention"),
    (trace("Working backwards from the answer, 6 / 2 = 3.", "6"), "stop", "6", "x", True, "leak_mention"),
    (trace("Work backwards from the end.\n3 * 2 = 6", "6"), "stop", "6", "x", True, None),  # a real method
    (trace("The answer is given by 3 * 2 = 6", "6"), "stop", "6", "x", True, None),
    (trace("3 * 2 = 6 as if I did not know it", "6"), "stop", "6", "x", True, "leak_mention"),
    (trace("Solve the problem step by step as if you did not know it.\n3 * 2 = 6", "6"), "stop", "6", "x", True,
     "leak_mention"),  # quotes the hint
    (trace("We are given that x = 3.\nSo 2x = 6.\nThe correct final answer is 6", "6"), "stop", "6",
     "x", True, None),  # ordinary words of a genuine trace
    (trace("Let me solve the problem step by step.\n3 * 2 = 6", "6"), "stop", "6", "x", True, None),
    (trace("1,200 / 2 = 600", "600"), "stop", "600", "x", True, None),
    (trace("The total is 1,200.\n1200 / 2 = 600", "1200"), "stop", "1200", "x", True, "leak_early_answer"),
    (trace("I will not state it before your reasoning reaches it.\n3 * 2 = 6", "6"), "stop", "6", "x", True,
     "leak_mention"),  # quotes the hint's last words
    (trace("Each pen costs 1.6 dollars.\n1.6 * 5 = 8, 8 - 2 = 6", "6"), "stop", "6", "Five pens cost 8 dollars less 2.",
     True, None),  # 1.6 is not 6
])
def test_rejection_reasons(text, finish, gold, problem, hinted, expected):
    template = make_traces.HINT_TEMPLATE if hinted else None
    assert rejection_reason(text, finish, grade(text, gold, timeout=None), gold, problem, template) == expected


def test_resume_after_a_kill_gives_the_same_file_and_it_trains(teacher, tmp_path, monkeypatch):
    straight = run(teacher, tmp_path / "straight")
    assert straight["kept"]["sampled"] + straight["kept"]["hinted"] > 0
    make_chunk, calls = make_traces.make_chunk, []

    def killed_after_one_chunk(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the process dies in the middle of its second chunk
        calls.append(1)
        return make_chunk(*args, **kwargs)

    monkeypatch.setattr(make_traces, "make_chunk", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(teacher, tmp_path / "resumed")
    (tmp_path / "resumed" / "chunks" / "chunk_000001.json.tmp").write_text("[{\"half\": ")  # killed mid-write
    counted = []
    monkeypatch.setattr(make_traces, "make_chunk", lambda *a, **k: counted.append(1) or make_chunk(*a, **k))
    resumed = run(teacher, tmp_path / "resumed")
    assert len(counted) == 2  # the first chunk was not sampled again
    assert (tmp_path / "resumed" / "traces.jsonl").read_text() == (tmp_path / "straight" / "traces.jsonl").read_text()
    assert resumed["rejected"] == straight["rejected"]
    run(teacher, tmp_path / "resumed", "--keep=2")  # only the selection changes: nothing is sampled
    assert len(counted) == 2 and all(row in rows(tmp_path / "resumed") for row in rows(tmp_path / "straight"))
    with pytest.raises(SystemExit, match="samples differ"):
        run(teacher, tmp_path / "resumed", "--samples=3")
    metrics = train_sft.main([f"--data={tmp_path / 'straight' / 'traces.jsonl'}", f"--model={teacher[0]}",
                              f"--out_dir={tmp_path / 'sft'}", "--max_steps=2", "--batch_size=2",
                              "--micro_batch_size=2", "--warmup_steps=1", "--eval_problems=0"])
    assert metrics["loss"] > 0


def test_two_processes_equal_one(teacher, tmp_path):
    path, problems = teacher
    args = [f"--teacher={path}", f"--data={problems}", "--chunk=1", "--max_new_tokens=24", f"--hint_template={HINT}"]
    for nproc in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   os.path.join(ROOT, "make_traces.py")] + args + [f"--out_dir={tmp_path / str(nproc)}"]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (tmp_path / "1" / "traces.jsonl").read_text(), (tmp_path / "2" / "traces.jsonl").read_text()
    assert one == two and one
    summaries = [json.loads((tmp_path / str(n) / "summary.json").read_text()) for n in (1, 2)]
    assert summaries[0]["rejected"] == summaries[1]["rejected"]


def test_bad_flags_name_themselves(teacher, tmp_path):
    with pytest.raises(SystemExit, match="--hint='sometimes'"):
        run(teacher, tmp_path, "--hint=sometimes")
    with pytest.raises(SystemExit, match="--hint_template must contain"):
        run(teacher, tmp_path, "--hint_template=no answer here")
    with pytest.raises(SystemExit, match="--teacher=.*missing.* is not a model folder"):
        make_traces.main([f"--teacher={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}"])
