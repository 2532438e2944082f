# python -m pytest tests/test_data.py -q
import json
import os
import types

import pytest

from conftest import SHARED, requires_shared
from data import Tokenizer, read_jsonl, sft_example
from tasks import build_demo_tokenizer

TOKENIZERS = ["qwen2.5-instruct", "deepseek-r1-distill-qwen", "qwen3", "llama-3.2-instruct"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny_tokenizer(path, chat_template=CHATML, eos_token="<|im_end|>", eos_token_ids=(2, 0)):
    """A byte-level BPE tokenizer trained in-test with a ChatML template: the real tokenizers' code path, offline."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["What is 1+1? The answer is 2.", "<think> 3 + 4 = 7 </think> \\boxed{7}"] * 50, trainer)
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": eos_token, "pad_token": "<|endoftext|>", "chat_template": chat_template}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": list(eos_token_ids)}, f)
    return Tokenizer.from_pretrained(path)


def test_tiny_tokenizer_round_trip_and_template(tmp_path):
    tok = build_tiny_tokenizer(tmp_path)
    text = "What is 3 + 4? <think> 7 </think>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == [2, 0] and tok.pad_token_id == 0
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.end_of_turn() == "<|im_end|>\n"


@pytest.mark.parametrize("eos_token_ids", [(2, 0), (0, 2)])  # the turn's stop token first, or not (Llama-3's list)
def test_loss_mask_covers_completion_and_end_of_turn_only(tmp_path, eos_token_ids):
    tok = build_tiny_tokenizer(tmp_path, eos_token_ids=eos_token_ids)
    prompt = [{"role": "user", "content": "What is 1+1?"}]
    ids, mask = tok.encode_chat(prompt, "The answer is 2.")
    prompt_ids = tok.encode(tok.apply_chat_template(prompt))
    assert ids[: len(prompt_ids)] == prompt_ids and mask[: len(prompt_ids)] == [0] * len(prompt_ids)
    completion = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(completion) == "The answer is 2.<|im_end|>"
    assert ids[-1] == tok.token_to_id("<|im_end|>") and mask[-1] == 1
    assert len(ids) == len(mask)


def test_a_stop_token_is_appended_when_the_end_of_turn_has_none(tmp_path):
    """A base model's ChatML (Qwen2.5-Math: end of turn <|im_end|>, its only stop token <|endoftext|>): without the
    appended stop token the model would never learn to end its answer."""
    tok = build_tiny_tokenizer(tmp_path, eos_token="<|endoftext|>", eos_token_ids=[0])
    assert tok.eos_token_ids == [0] and tok.end_of_turn() == "<|im_end|>\n"
    ids, mask = tok.encode_chat([{"role": "user", "content": "What is 1+1?"}], "The answer is 2.")
    assert ids[-1] == 0 and mask[-1] == 1
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "The answer is 2.<|im_end|>\n<|endoftext|>"


@pytest.mark.parametrize("completion", ["<think>\n1+1=2\n</think>\n\n\\boxed{2}",
                                        "<think>1+1=2\n</think>\n\n\\boxed{2}"])
def test_a_template_that_opens_the_think_block_gets_it_once(tmp_path, completion):
    """R1-distill templates end the generation prompt with <think>\\n, and traces carry <think> too: the tokens
    trained on are the prompt's, then the trace after its <think> and the newline behind it, exactly what a sampler
    continuing the prompt would write."""
    tok = build_tiny_tokenizer(tmp_path, chat_template=CHATML.replace("assistant\n' }}", "assistant\n<think>\n' }}"))
    prompt = [{"role": "user", "content": "What is 1+1?"}]
    rendered = tok.apply_chat_template(prompt)
    assert rendered.endswith("assistant\n<think>\n")
    ids, mask = tok.encode_chat(prompt, completion)
    assert tok.decode(ids) == rendered + "1+1=2\n</think>\n\n\\boxed{2}<|im_end|>"
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "1+1=2\n</think>\n\n\\boxed{2}<|im_end|>"


def test_template_arguments_reach_the_sft_prompt(tmp_path):
    """encode_chat passes its keyword arguments to the template (Llama-3's date_string, Qwen3's enable_thinking):
    the trained prompt is the one evaluation renders with the same arguments."""
    dated = CHATML.replace("{% for message", "{% if date_string is defined %}{{ 'Date: ' + date_string + '\n' }}"
                                             "{% endif %}{% for message")
    tok = build_tiny_tokenizer(tmp_path, chat_template=dated)
    prompt = [{"role": "user", "content": "What is 1+1?"}]
    ids, mask = tok.encode_chat(prompt, "2", date_string="26 Jul 2024")
    rendered = tok.apply_chat_template(prompt, date_string="26 Jul 2024")
    assert rendered.startswith("Date: 26 Jul 2024\n")
    assert tok.decode([t for t, m in zip(ids, mask) if not m]) == rendered


def test_templates_render_with_trim_and_lstrip_blocks_as_transformers_does(tmp_path):
    """Indented block tags and the newline after each vanish (transformers compiles templates with trim_blocks
    and lstrip_blocks); the stored real templates happen not to need lstrip, a custom one may."""
    template = ("{%- for message in messages %}\n    {% if message['role'] == 'user' %}\nU:{{ message['content'] }}\n"
                "    {% endif %}\n{% endfor %}")
    tok = build_tiny_tokenizer(tmp_path, chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "U:hi\n"


def test_sft_records_become_the_prompt_messages_and_the_completion():
    user = {"role": "user", "content": "Ben has 2 eggs."}
    answer = {"role": "assistant", "content": "2"}
    assert sft_example({"messages": [user, answer]}) == ([user], "2")  # the answer never leaks into the prompt
    system = {"role": "system", "content": "Be brief."}
    assert sft_example({"messages": [system, user, answer]}) == ([system, user], "2")
    assert sft_example({"prompt": "Ben has 2 eggs.", "completion": "2"}, system_prompt="Be brief.") == \
        ([system, user], "2")
    assert sft_example({"prompt": "Ben has 2 eggs.", "completion": "2"}) == ([user], "2")
    messages, completion = sft_example({"problem": "Ben has 2 eggs.", "reasoning": "  he has 2\n", "answer": "2"},
                                       system_prompt="Be brief.")
    assert messages == [system, user] and completion == "<think>\nhe has 2\n</think>\n\n\\boxed{2}"


def test_blank_lines_are_skipped_and_every_record_keeps_its_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n\n  \n{"a": 2}\n{"a": 3}\n\n')
    records = read_jsonl(data)
    assert [(r["a"], r["_source"]) for r in records] == [(1, f"{data}:1"), (2, f"{data}:4"), (3, f"{data}:5")]


def test_a_line_that_is_not_an_object_names_the_file_and_line(tmp_path):
    data = tmp_path / "data.jsonl"
    for line, kind in (("[1, 2]", "list"), ('"text"', "str"), ("null", "NoneType")):
        data.write_text('{"a": 1}\n' + line + "\n")
        with pytest.raises(ValueError, match=rf"data.jsonl:2: expected a JSON object, got {kind}"):
            read_jsonl(data)


def test_sft_records_with_an_empty_field_or_no_prompt_are_refused():
    """An empty completion would teach the model to stop at once; a conversation of the answer alone has no prompt."""
    with pytest.raises(ValueError, match=r"x.jsonl:3: field 'completion' must be a non-empty string"):
        sft_example({"prompt": "Ben has 2 eggs.", "completion": "", "_source": "x.jsonl:3"})
    with pytest.raises(ValueError, match=r"field 'answer' must be a non-empty string"):
        sft_example({"problem": "Ben has 2 eggs.", "reasoning": "he has 2", "answer": ""})
    with pytest.raises(ValueError, match=r"field 'messages' must be a list of at least two"):
        sft_example({"messages": [{"role": "assistant", "content": "2"}]})


def rewrite_tokenizer_config(path, **fields):
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(fields, f)
    return Tokenizer.from_pretrained(path)


def test_the_default_of_named_chat_templates_is_the_chat_template(tmp_path):
    """tokenizer_config.json may hold a list of named templates (tool use first, as some models ship them)."""
    build_tiny_tokenizer(tmp_path)
    tok = rewrite_tokenizer_config(tmp_path, eos_token="<|im_end|>", chat_template=[
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}])
    assert tok.chat_template == CHATML
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user\nhi")


def test_a_chat_template_jinja_beside_the_tokenizer_is_read(tmp_path):
    """Newer transformers save the template as chat_template.jinja, not in tokenizer_config.json."""
    build_tiny_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    tok = rewrite_tokenizer_config(tmp_path, eos_token="<|im_end|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_templates_see_the_special_tokens(tmp_path):
    """Llama-3's template writes {{ bos_token }}; tokenizer_config.json may store a token as an AddedToken dict."""
    build_tiny_tokenizer(tmp_path)
    tok = rewrite_tokenizer_config(tmp_path, bos_token={"content": "<|endoftext|>", "lstrip": False},
                                   eos_token="<|im_end|>",
                                   chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}"
                                                 "{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|endoftext|>hi<|im_end|>"


def test_stop_ids_are_generation_configs_then_the_eos_token(tmp_path):
    """generation_config.json holds one id (Qwen2.5-Math's) or a list; tokenizer_config.json's eos_token stops a turn
    too (appended when missing), and is the only stop token when there is no generation_config.json."""
    build_tiny_tokenizer(tmp_path, eos_token="<|im_end|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [0, 2]
    (tmp_path / "generation_config.json").unlink()
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [2]


def test_a_pad_token_outside_the_vocabulary_is_refused_naming_the_file(tmp_path):
    build_tiny_tokenizer(tmp_path)
    assert rewrite_tokenizer_config(tmp_path, pad_token="<|endoftext|>").pad_token_id == 0
    with pytest.raises(ValueError, match=r"tokenizer_config.json: pad_token '<pad>' is not in the tokenizer's vocab"):
        rewrite_tokenizer_config(tmp_path, pad_token="<pad>")


def test_tokenizer_save_and_reload(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "a")
    tok.save_pretrained(tmp_path / "b")
    again = Tokenizer.from_pretrained(tmp_path / "b")
    assert again.encode("What is 1+1?") == tok.encode("What is 1+1?")
    assert again.eos_token_ids == tok.eos_token_ids and again.chat_template == tok.chat_template


@requires_shared("assets", "tokenizers")
@pytest.mark.parametrize("name", TOKENIZERS)
def test_real_tokenizer_ids_match_transformers(name):
    path = os.path.join(SHARED, "assets", "tokenizers", name)
    tok = Tokenizer.from_pretrained(path)
    with open(os.path.join(path, "expected_ids.json")) as f:
        expected = json.load(f)
    for case in expected["strings"]:
        assert tok.encode(case["text"]) == case["no_special"], case["text"]
    for token, token_id in expected["special_tokens"].items():
        assert tok.token_to_id(token) == token_id


@requires_shared("assets", "tokenizers")
@pytest.mark.parametrize("name", TOKENIZERS)
def test_real_chat_templates_match_transformers(name):
    path = os.path.join(SHARED, "assets", "tokenizers", name)
    tok = Tokenizer.from_pretrained(path)
    kwargs = {"date_string": "26 Jul 2024"} if name.startswith("llama") else {}
    with open(os.path.join(path, "expected_chat.txt")) as f:
        assert tok.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], **kwargs) == f.read()
    with open(os.path.join(path, "expected_chat_variants.json")) as f:
        variants = json.load(f)
    for variant_name, case in variants.items():
        rendered = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"],
                                           **case["template_kwargs"])
        assert rendered == case["rendered"], variant_name
    with open(os.path.join(path, "expected_ids.json")) as f:
        chat = json.load(f)["chat_user_gen"]
    assert tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], **kwargs)) == \
        chat["ids_no_special"]


CONTENT_PIECES = ["What is 1+1?", "  leading", "trailing  ", "\n", "\n\n", "\r\n", "\t tab", "", " ", "x^2 + y^2 = z^2",
                  "\\boxed{42}", "$\\frac{1}{2}$", "<think>\nreasoning\n</think>\n\n", "<think>", "</think>",
                  "ünïcødé 数学 🙂", "{{ not jinja }}", "{% raw %}", "<|im_end|>", "<|eot_id|>", "<｜end▁of▁sentence｜>",
                  "<tool_call>", "'quotes' \"double\"", "Step 1: 3 * 4 = 12.", "a" * 50]


def random_conversation(rng):
    """An optional system message, one to three user/assistant turns of pieces real traces hold (whitespace at
    either end, LaTeX, think tags, special-token text, braces a template engine might read), the last assistant
    message dropped more often than not."""
    content = lambda: "".join(rng.choice(CONTENT_PIECES) for _ in range(rng.randint(0, 5)))
    messages = [{"role": "system", "content": content()}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": content()}, {"role": "assistant", "content": content()}]
    return messages[:-1] if rng.random() < 0.6 else messages


@requires_shared("assets", "tokenizers")
@pytest.mark.parametrize("name", TOKENIZERS)
def test_real_chat_templates_and_ids_match_transformers_on_generated_conversations(name):
    """Beyond the fixed conversations above: 150 generated ones per tokenizer, rendered by ours and by transformers'
    apply_chat_template (with and without the generation prompt, Qwen3's enable_thinking either way, Llama's date
    from the clock), must give the same text and, tokenized, the same ids."""
    import random

    transformers = pytest.importorskip("transformers")
    path = os.path.join(SHARED, "assets", "tokenizers", name)
    ours, theirs = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    rng = random.Random(name)
    for _ in range(150):
        messages = random_conversation(rng)
        kwargs = dict(add_generation_prompt=messages[-1]["role"] == "user" and rng.random() < 0.8)
        if name == "qwen3" and rng.random() < 0.5:
            kwargs["enable_thinking"] = rng.random() < 0.5
        rendered = ours.apply_chat_template(messages, **kwargs)
        assert rendered == theirs.apply_chat_template(messages, tokenize=False, **kwargs), (messages, kwargs)
        assert ours.encode(rendered) == theirs(rendered, add_special_tokens=False)["input_ids"], rendered


@requires_shared("assets", "tokenizers")
@pytest.mark.parametrize("name", TOKENIZERS)
def test_real_tokenizers_decode_generated_ids_as_transformers_does(name):
    """The verifier grades decode(completion, skip_special_tokens=True): on 1,000 random id sequences (any id of
    the vocabulary, special and added tokens one in ten) and on a character's bytes cut in two, the text must be
    transformers' with and without skipping the special tokens. Neither cleans up spaces before punctuation (Llama-3's
    config asks for it; it corrupts byte-level BPE text, and transformers 5 ignores it there: asked for explicitly
    here, so that the test means the same on transformers 4)."""
    import random

    transformers = pytest.importorskip("transformers")
    path = os.path.join(SHARED, "assets", "tokenizers", name)
    ours, theirs = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    special = sorted(set(theirs.all_special_ids) | set(theirs.added_tokens_decoder))
    rng = random.Random(name)
    spaced = theirs("The answer is 5 . So , x = 3 ! I 'm sure .", add_special_tokens=False)["input_ids"]
    # byte-level pieces of the bytes F0 9F, the first half of 🙂: a character cut in two
    lead = theirs.convert_tokens_to_ids(["ð", "Ł"])
    assert all(isinstance(i, int) for i in lead) and theirs.decode(lead) != "ðŁ"
    cases = [spaced, lead[:1], lead, lead + spaced]
    cases += [[rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(theirs))
               for _ in range(rng.randint(1, 30))] for _ in range(1000)]
    for ids in cases:
        for skip in (True, False):
            expected = theirs.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, ids


@requires_shared("assets", "tokenizers")
@pytest.mark.parametrize("name", TOKENIZERS)
def test_real_loss_mask_ends_on_a_stop_token(name):
    tok = Tokenizer.from_pretrained(os.path.join(SHARED, "assets", "tokenizers", name))
    kwargs = {"date_string": "26 Jul 2024"} if name.startswith("llama") else {}
    ids, mask = tok.encode_chat([{"role": "user", "content": "1+1?"}], "<think>\n1+1=2\n</think>\n\n\\boxed{2}", **kwargs)
    assert mask[-1] == 1 and ids[-1] in tok.eos_token_ids
    completion = tok.decode([t for t, m in zip(ids, mask) if m])
    assert completion.endswith("\\boxed{2}" + tok.decode([ids[-1]]))
    assert "1+1?" not in completion


@pytest.mark.parametrize("instruction", ["", "none", "Please reason step by step, and put your final answer within "
                                                    "\\boxed{}."])
def test_training_evaluation_and_traces_render_one_prompt(tmp_path, instruction, monkeypatch):
    """train_grpo.py, eval.py and make_traces.py once each wrote the prompt, and with --instruction="" training
    appended a newline that evaluation did not: the model was trained and evaluated on different prompts. All
    three now reach the prompt through Task.prompt / data.user_message; this checks what each sends."""
    import make_traces
    import tasks
    import train_grpo
    from data import render_prompt, user_message

    tokenizer = build_demo_tokenizer(str(tmp_path))
    problem = "Tom has 3 apples and gets 4 more. How many apples does he have?"
    expected = render_prompt(tokenizer, problem, instruction)
    assert tokenizer.decode(expected).count(problem) == 1
    assert user_message(problem, instruction) == (problem if instruction in ("", "none") else f"{problem}\n{instruction}")
    sent = []

    def fake_generate(model, prompts, *args, **kwargs):
        sent.append(list(prompts[0]))
        raise StopIteration  # the prompt is all this test needs

    for module in (tasks, make_traces):
        monkeypatch.setattr(module, "generate", fake_generate)
    config = types.SimpleNamespace(instruction=instruction, max_new_tokens=4, temperature=1.0, top_p=1.0,
                                   group_size=1, cuda_graph=False)
    monkeypatch.setattr(train_grpo, "generate", fake_generate)
    demo = tasks.DemoTask()
    for call in (lambda: train_grpo.rollout(None, tokenizer, demo, [{"problem": problem, "answer": "7"}], config, 0),
                 lambda: tasks.evaluate(None, tokenizer, demo, [{"id": "a", "problem": problem, "answer": "7"}],
                                        instruction=instruction, show_progress=False),
                 lambda: make_traces.sample(None, tokenizer, [user_message(problem, instruction)], 1,
                                            types.SimpleNamespace(max_new_tokens=4, temperature=1.0, top_p=1.0,
                                                                  max_slots=0, cuda_graph=False), 0, None)):
        with pytest.raises(StopIteration):
            call()
    assert sent == [expected] * 3
