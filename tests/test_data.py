# python -m pytest tests/test_data.py -q
import json
import os
import types

import pytest

from conftest import SHARED, requires_shared
from data import Tokenizer
from tasks import build_demo_tokenizer

TOKENIZERS = ["qwen2.5-instruct", "deepseek-r1-distill-qwen", "qwen3", "llama-3.2-instruct"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny_tokenizer(path):
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
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 0]}, f)
    return Tokenizer.from_pretrained(path)


def test_tiny_tokenizer_round_trip_and_template(tmp_path):
    tok = build_tiny_tokenizer(tmp_path)
    text = "What is 3 + 4? <think> 7 </think>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == [2, 0] and tok.pad_token_id == 0
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.end_of_turn() == "<|im_end|>\n"


def test_loss_mask_covers_completion_and_end_of_turn_only(tmp_path):
    tok = build_tiny_tokenizer(tmp_path)
    prompt = [{"role": "user", "content": "What is 1+1?"}]
    ids, mask = tok.encode_chat(prompt, "The answer is 2.")
    prompt_ids = tok.encode(tok.apply_chat_template(prompt))
    assert ids[: len(prompt_ids)] == prompt_ids and mask[: len(prompt_ids)] == [0] * len(prompt_ids)
    completion = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(completion) == "The answer is 2.<|im_end|>"
    assert ids[-1] == tok.token_to_id("<|im_end|>") and mask[-1] == 1
    assert len(ids) == len(mask)


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
