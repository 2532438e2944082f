# python -m pytest tests/test_make_traces.py -q
import json
import os
import shutil
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
    assert kept[ava] == dict(kept[ava], kind="sampled", completion=trace("3 + 2 = 5", "5"), teacher_pass_rate=1.0,
                             hinted_pass_rate=None)  # never hinted: no rate, not a rate of 0
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
    summary = run(scripted_teacher, tmp_path / "never", "--hint=never", "--keep=2")
    kept = rows(tmp_path / "never")
    assert [row["completion"] for row in kept] == [trace("3 + 2 = 5", "5"), trace("Ava has 3 pens.\n3 + 2 = 5", "5"),
                                                   trace("6 - 3 = 3", "3")]  # distinct, the shortest first
    assert summary["kept"] == {"sampled": 3, "hinted": 0} and summary["problems_with_a_trace"] == 2


def test_a_completion_gets_the_think_its_chat_template_opened(monkeypatch):
    """A template that ends by opening <think> (R1's distills' do) leaves it out of the sampled tokens: the text
    gets it back, unless the teacher wrote one itself; a template that opens none adds none."""
    class CharacterTokenizer:  # token ids are characters; the template appends `opening` to the user turn
        eos_token_ids = [0]

        def __init__(self, opening):
            self.opening = opening

        def apply_chat_template(self, messages):
            return messages[0]["content"] + self.opening

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    written = ["6 = 6\n</think>\n\\boxed{6}", "<think>\n6 = 6\n</think>\n\\boxed{6}"]
    monkeypatch.setattr(make_traces, "generate", lambda model, prompts, max_new_tokens, n=1, **_: [
        Completion(0, [ord(c) for c in text], [0.0] * len(text), "stop") for text in written])
    config = make_traces.Config()
    opened = make_traces.sample(None, CharacterTokenizer("\n<think>\n"), ["x"], 2, config, 0, None)
    assert opened == [("<think>\n" + written[0], "stop", len(written[0])), (written[1], "stop", len(written[1]))]
    plain = make_traces.sample(None, CharacterTokenizer("\n"), ["x"], 2, config, 0, None)
    assert [text for text, _, _ in plain] == written


def test_fallback_hints_every_problem_without_a_trace_and_records_keep_their_own_lengths(monkeypatch):
    """Right answers cut off by --max_new_tokens are no trace, so --hint=fallback hints that problem too; the hint
    is the template with only {answer} filled in (its other braces as written); each record holds its own
    problem's completion lengths, in sampling order."""
    problems = [{"problem": f"Problem {i}.", "answer": str(i + 1)} for i in range(3)]
    asked = []

    def sample(teacher, tokenizer, messages, n, config, seed, progress):
        """Problem 0 right, problem 1 right but cut off, problem 2 wrong, all right with the hint; the lengths
        are 10 x problem + sample, plus 100 with the hint."""
        asked.append(messages)
        hinted = len(asked) == 2
        results = []
        for message in messages:
            i = int(message.split()[1].rstrip("."))
            answer = str(i + 1) if hinted or i < 2 else "99"
            finish = "length" if i == 1 and not hinted else "stop"
            results += [(trace("Count on.", answer), finish, 100 * hinted + 10 * i + s) for s in range(n)]
        return results

    monkeypatch.setattr(make_traces, "sample", sample)
    config = make_traces.Config(samples=2, hint_samples=3, hint_template="\nHint: {answer}; write it in \\boxed{}.")
    records = make_traces.make_chunk(None, None, problems, 10, config, seed=0, progress=None)
    assert asked[1] == ["Problem 1.\nHint: 2; write it in \\boxed{}.", "Problem 2.\nHint: 3; write it in \\boxed{}."]
    assert [r["problem_index"] for r in records] == [10, 11, 12]
    assert [r["rejected_sampled"] for r in records] == [{"duplicate": 1}, {"truncated": 2}, {"incorrect": 2}]
    assert [r["hinted_samples"] for r in records] == [0, 3, 3]
    assert [r["sampled_lengths"] for r in records] == [[0, 1], [10, 11], [20, 21]]
    assert [r["hinted_lengths"] for r in records] == [[], [110, 111, 112], [120, 121, 122]]
    assert [[row["kind"] for row in make_traces.select(r, "fallback", 1)] for r in records] == [
        ["sampled"], ["hinted"], ["hinted"]]


def test_a_last_short_chunk_is_made_and_every_sampler_call_has_a_seed_of_its_own(scripted_teacher, tmp_path,
                                                                                   monkeypatch):
    """Six problems in chunks of four: a chunk of four, then one of two. The sampled and the hinted completions
    of each chunk are drawn with seeds no other call shares."""
    scripted, seeds = make_traces.generate, []
    monkeypatch.setattr(make_traces, "generate", lambda *args, **kwargs: seeds.append(kwargs["seed"]) or
                        scripted(*args, **kwargs))
    summary = run(scripted_teacher, tmp_path, "--hint=always", "--chunk=4")
    assert summary["problems"] == len(TEACHER) == 6
    assert sorted(os.listdir(tmp_path / "chunks")) == ["chunk_000000.json", "chunk_000001.json"]
    assert len(seeds) == 4 and len(set(seeds)) == 4


def test_a_teacher_retrained_in_the_same_folder_does_not_resume_the_old_ones_chunks(scripted_teacher, tmp_path):
    path, problems = scripted_teacher
    teacher = str(shutil.copytree(path, tmp_path / "teacher"))
    run((teacher, problems), tmp_path / "out")
    model = Transformer.from_pretrained(teacher)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(teacher)
    with pytest.raises(SystemExit, match="teacher_weights differ"):
        run((teacher, problems), tmp_path / "out")


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
    (trace("The price is 6.5 dollars.\n6.5 - 0.5 = 6", "6"), "stop", "6", "x", True, None),  # 6.5 is not 6
    (trace("It starts at -30 degrees.\n-30 + 27 = -3", "-3"), "stop", "-3", "x", True, None),  # -30 is not -3
    (trace("So it is x+1.\nf(x) = x + 1", "x + 1"), "stop", "x + 1", "f(x)", True, "leak_early_answer"),  # spaces
    (trace("Reading the problem again, the number of coins at the end is 6.\n3 * 2 = 6", "6"), "stop", "6", "x",
     True, "leak_early_answer"),  # a long opening sentence
    ("<think>3 * 2 = 6</think> The result is \\boxed{6}.", "stop", "6", "x", True, None),  # the box is no opening
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
