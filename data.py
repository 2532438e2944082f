"""
The tokenizer, chat templates, JSONL reading, the prompt of a problem and the SFT record formats. Problem sets
(and the built-in demo) are in tasks.py.

    tok = Tokenizer.from_pretrained("path/to/model")         # tokenizer.json + tokenizer_config.json
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}])   # the model's own Jinja template
    ids, loss_mask = tok.encode_chat(prompt_messages, completion_text)        # for SFT

Chat templates are rendered the way transformers renders them (sandboxed Jinja with trim_blocks and lstrip_blocks,
the same helpers), so a prompt is byte-for-byte the one the model was trained with.
"""

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# -----------------------------------------------------------------------------
# tokenizer and chat template


def _token_text(token):
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


MAX_TEMPLATE_OUTPUT = 2**20  # characters a chat template may add to a conversation's own text


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, generation_config: dict | None = None, path=None):
        self.tk = tokenizer
        self.config = config
        self.path = path
        self.generation_config = dict(generation_config or {})
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one is the chat template
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template
        self._template = compile_chat_template(template) if template else None
        self.special_tokens = {name: _token_text(config.get(name)) for name in
                               ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos = self.generation_config.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.special_tokens["eos_token"] is not None:
            eos_id = self.tk.token_to_id(self.special_tokens["eos_token"])
            if eos_id is not None and eos_id not in eos:
                eos.append(eos_id)
        self.eos_token_ids = eos  # every id that ends a turn, as generation_config lists them
        pad = self.special_tokens["pad_token"]
        self.pad_token_id = self.tk.token_to_id(pad) if pad else (eos[0] if eos else 0)
        if self.pad_token_id is None:  # padding would fail mid-run, far from the file that caused it
            raise ValueError(f"{os.path.join(path or '.', 'tokenizer_config.json')}: pad_token {pad!r} is not in "
                             f"the tokenizer's vocabulary")

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        def read_json(name, required):
            file = os.path.join(path, name)
            if not os.path.exists(file):
                if required:
                    raise FileNotFoundError(f"{file} is missing")
                return None
            with open(file) as f:
                try:
                    return json.load(f)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{file}: not valid JSON ({error})") from None

        config = read_json("tokenizer_config.json", required=False) or {}
        if "chat_template" not in config and os.path.exists(os.path.join(path, "chat_template.jinja")):
            with open(os.path.join(path, "chat_template.jinja")) as f:  # newer transformers save it beside
                config["chat_template"] = f.read()
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{tokenizer_file} is missing")
        try:
            tokenizer = HFTokenizer.from_file(tokenizer_file)
        except Exception as error:  # the tokenizers library raises plain Exceptions without the path
            raise ValueError(f"{tokenizer_file}: not a tokenizers file ({error})") from None
        return cls(tokenizer, config, read_json("generation_config.json", required=False), path=path)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """No special tokens are added: chat templates write BOS themselves, and adding it twice is a classic bug."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.tk.token_to_id(token)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs) -> str:
        if self._template is None:
            raise ValueError(f"{self.path}: tokenizer_config.json has no chat_template")
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs)
        # the sandbox stops a template from touching Python, not from looping: bound what it may write
        limit = MAX_TEMPLATE_OUTPUT + 2 * sum(len(str(m.get("content", ""))) for m in messages)
        pieces, size = [], 0
        for piece in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                             **variables):
            size += len(piece)
            if size > limit:
                raise ValueError(f"{self.path}: the chat template rendered more than {limit / 2**20:.0f} MB for one "
                                 f"conversation; refusing it (a template that loops?)")
            pieces.append(piece)
        return "".join(pieces)

    def end_of_turn(self) -> str:
        """The text the template writes after an assistant message, found by rendering a marker."""
        marker = "\u2063END-OF-CONTENT\u2063"
        rendered = self.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], add_generation_prompt=False)
        return rendered[rendered.rindex(marker) + len(marker):]

    def encode_chat(self, prompt_messages, completion: str, **template_kwargs):
        """(input_ids, loss_mask) for SFT: the prompt rendered with the generation prompt, then the completion and
        the end-of-turn text. The mask is 1 on exactly the completion and its end-of-turn token (a trainer that
        masks that token never learns to stop). The pieces are tokenized apart, as the sampler sees them."""
        prompt = self.apply_chat_template(prompt_messages, add_generation_prompt=True, **template_kwargs)
        if prompt.endswith("<think>\n") and completion.startswith("<think>"):
            # R1-style templates open the think block themselves; traces usually carry it too
            completion = completion[len("<think>"):].removeprefix("\n")
        prompt_ids, completion_ids = self.encode(prompt), self.encode(completion)
        end_ids = self.encode(self.end_of_turn())
        stops = [i for i, t in enumerate(end_ids) if t in self.eos_token_ids]
        # keep the end-of-turn text up to its stop token; what follows it (a newline) is never generated
        end_ids = end_ids[: stops[0] + 1] if stops else end_ids + self.eos_token_ids[:1]
        input_ids = prompt_ids + completion_ids + end_ids
        loss_mask = [0] * len(prompt_ids) + [1] * (len(completion_ids) + len(end_ids))
        return input_ids, loss_mask

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        self.tk.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(self.config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(dict(self.generation_config, eos_token_id=self.eos_token_ids), f, indent=2)


# -----------------------------------------------------------------------------
# data sets: JSONL records with clear errors


def read_jsonl(path, allow_empty=False) -> list[dict]:
    """Every line a JSON object; a malformed line is an error naming the file and line, never skipped. A file
    with no record at all is an error too (unless allow_empty), as is a path that is not a file."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a JSONL file")
    records = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            record["_source"] = f"{path}:{line_number}"
            records.append(record)
    if not records and not allow_empty:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


def _require_string(record, field_name):
    value = record.get(field_name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{record.get('_source', '?')}: field '{field_name}' must be a non-empty string, "
                         f"got {value!r:.60}")
    return value


def user_message(problem: str, instruction: str) -> str:
    """The user turn of a problem, the one way training, evaluation and make_traces.py write it: the problem, then
    the instruction on a line of its own; "" or "none" for no instruction (then the problem alone, no newline)."""
    return problem if not instruction or instruction == "none" else f"{problem}\n{instruction}"


def render_prompt(tokenizer, problem: str, instruction: str) -> list[int]:
    """The prompt's token ids: the user turn in the model's chat template, ready for the assistant's reply."""
    messages = [{"role": "user", "content": user_message(problem, instruction)}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages))


def sft_example(record, system_prompt=None) -> tuple[list[dict], str]:
    """(prompt messages, completion) from {"prompt","completion"}, {"messages": [...]} (the last message is the
    assistant's) or {"problem","reasoning","answer"} (rendered as <think>reasoning</think> \\boxed{answer})."""
    source = record.get("_source", "?")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{source}: field 'messages' must be a list of at least two role/content objects")
        for i, message in enumerate(messages):
            if message.get("role") not in ("system", "user", "assistant") or not isinstance(message.get("content"), str):
                raise ValueError(f"{source}: field 'messages[{i}]' needs a role (system/user/assistant) and content")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{source}: field 'messages' must end with an assistant message")
        return messages[:-1], messages[-1]["content"]
    if "prompt" in record or "completion" in record:
        prompt, completion = _require_string(record, "prompt"), _require_string(record, "completion")
    elif "problem" in record:
        prompt = _require_string(record, "problem")
        completion = f"<think>\n{_require_string(record, 'reasoning').strip()}\n</think>\n\n" \
                     f"\\boxed{{{_require_string(record, 'answer')}}}"
    else:
        raise ValueError(f"{source}: expected fields prompt/completion, messages, or problem/reasoning/answer; "
                         f"found {sorted(k for k in record if k != '_source')}")
    messages = [{"role": "user", "content": prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages, completion
