"""Conversational pairs through the chat templates real models publish (Llama 3.1, Qwen 2.5, Mistral v0.3, Gemma 2/3).

Each template is written out below in the form its model publishes it (tool-calling branches left out: they do not
touch these rows) and set on a tiny byte-level tokenizer built offline with the special tokens, BOS and EOS that
model's tokenizer has. Expected ids are spelled out by hand, piece by piece: a special token is
`convert_tokens_to_ids`, a plain piece is `encode(..., add_special_tokens=False)`. A plain piece is always a whole
stretch of text between two special tokens, which is how the tokenizer splits the rendered text.
"""

from __future__ import annotations

import pytest
from helpers import one_line_error, write_jsonl

from prefpipe.data.formats import Dataset
from prefpipe.data.tokenize import PairTokenizer, TokenStats
from prefpipe.errors import UserError

LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# DeepSeek-R1 style: earlier assistant turns lose their <think> block, and the generation prompt opens one that the
# rendered assistant turn does not contain, so prompt + response is not the prompt plus more text.
R1_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

# name -> (template, special tokens, bos, eos, pad, whether a plain tokenizer(text) call prepends BOS)
MODELS = {
    "llama31": (LLAMA31, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", None, True),
    "qwen25": (QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", False),
    "mistral": (MISTRAL_V03, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", None, True),
    "gemma2": (GEMMA2, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
               True),
    "gemma3": (GEMMA3, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
               True),
    "r1": (R1_STYLE, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
           "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", None, True),
}

CORPUS = ["You are terse. What is 3 plus 4? 7 And 5 plus 6? 11 Eleven. Twelve, I think.",
          "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n user assistant model system",
          "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]


def build(root, name):
    """Save a tiny tokenizer shaped like `name`'s and load it back the way the CLI does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from prefpipe.tokenizer import load_tokenizer
    template, specials, bos, eos, pad, adds_bos = MODELS[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    named = {bos, eos, pad}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                 additional_special_tokens=[t for t in specials if t not in named])
    hf.chat_template = template
    out = root / name
    hf.save_pretrained(str(out))
    return out, load_tokenizer(str(out))


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {name: build(root, name) for name in MODELS}


def ids(tok, *pieces):
    """Hand-built ids: special tokens by name, every other piece encoded on its own."""
    out = []
    for p in pieces:
        special = p in tok.all_special_tokens
        out += [tok.convert_tokens_to_ids(p)] if special else tok.encode(p, add_special_tokens=False)
    return out


def tokenize(tok, tmp_path, rows):
    ds = Dataset(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    stats, out = TokenStats(), {}
    for batch in ds.batches():
        for k, v in PairTokenizer(tok).tokenize(batch, stats, ds.paired).items():
            out.setdefault(k, []).extend(v)
    return out, stats


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM = msg("system", "You are terse.")
TURNS = [msg("user", "What is 3 plus 4?"), msg("assistant", "7"), msg("user", "And 5 plus 6?")]


def pair(prompt):
    return {"prompt": prompt, "chosen": [msg("assistant", "11")], "rejected": [msg("assistant", "Twelve, I think.")]}


def check_row(tok, out, i, prompt, chosen, rejected):
    assert out["prompt_ids"][i] == prompt
    assert out["chosen_ids"][i] == chosen
    assert out["rejected_ids"][i] == rejected
    bos = tok.bos_token_id
    if bos is not None:  # BOS exactly once: first in the prompt, nowhere else
        assert out["prompt_ids"][i][0] == bos and out["prompt_ids"][i].count(bos) == 1
        assert bos not in out["chosen_ids"][i] + out["rejected_ids"][i]


# ---------------------------------------------------------------- rendering and ids, per template

def test_llama31(toks, tmp_path):
    _, tok = toks["llama31"]
    bos, eot = tok.convert_tokens_to_ids("<|begin_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.bos_token_id == bos and tok.eos_token_id == eot
    assert tok("hi")["input_ids"][0] == bos  # the post-processor adds BOS as well as the template writing it
    out, stats = tokenize(tok, tmp_path, [pair([SYSTEM, *TURNS]), pair(TURNS)])
    assert stats.rows_kept == 2
    H, E = "<|start_header_id|>", "<|end_header_id|>"
    turns = (H, "user", E, "\n\nWhat is 3 plus 4?", "<|eot_id|>", H, "assistant", E, "\n\n7", "<|eot_id|>",
             H, "user", E, "\n\nAnd 5 plus 6?", "<|eot_id|>", H, "assistant", E, "\n\n")
    dated = "\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    chosen, rejected = ids(tok, "11", "<|eot_id|>"), ids(tok, "Twelve, I think.", "<|eot_id|>")
    for i, system in enumerate(("You are terse.", "")):
        prompt = ids(tok, "<|begin_of_text|>", H, "system", E, dated + system, "<|eot_id|>", *turns)
        check_row(tok, out, i, prompt, chosen, rejected)
        # Boundary: the prompt ends with the assistant header, the response starts with the assistant's text.
        header = ids(tok, H, "assistant", E, "\n\n")
        assert out["prompt_ids"][i][-len(header):] == header
        assert out["chosen_ids"][i][0] == ids(tok, "11")[0]
        # The template's <|eot_id|> is also the EOS: it ends the response once, with nothing appended.
        assert out["chosen_ids"][i][-1] == eot and out["chosen_ids"][i].count(eot) == 1


def test_qwen25_default_system_prompt_and_no_bos(toks, tmp_path):
    _, tok = toks["qwen25"]
    assert tok.bos_token_id is None and tok.eos_token == "<|im_end|>"
    out, stats = tokenize(tok, tmp_path, [pair([SYSTEM, *TURNS]), pair(TURNS)])
    assert stats.rows_kept == 2
    S, N = "<|im_start|>", "<|im_end|>"
    turns = (S, "user\nWhat is 3 plus 4?", N, "\n", S, "assistant\n7", N, "\n", S, "user\nAnd 5 plus 6?", N, "\n",
             S, "assistant\n")
    default = "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    # The "\n" the template writes after <|im_end|> belongs to the response (see tokenize.py: "End of turn").
    chosen, rejected = ids(tok, "11", N, "\n"), ids(tok, "Twelve, I think.", N, "\n")
    for i, system in enumerate(("system\nYou are terse.", default)):
        check_row(tok, out, i, ids(tok, S, system, N, "\n", *turns), chosen, rejected)
        assert out["prompt_ids"][i][0] == tok.convert_tokens_to_ids(S)  # nothing prepended: Qwen has no BOS
        assert out["chosen_ids"][i].count(tok.eos_token_id) == 1


def test_mistral_v03_multi_turn(toks, tmp_path):
    _, tok = toks["mistral"]
    out, stats = tokenize(tok, tmp_path, [pair(TURNS)])
    assert stats.rows_kept == 1
    prompt = ids(tok, "<s>", "[INST]", " What is 3 plus 4?", "[/INST]", " 7", "</s>", "[INST]", " And 5 plus 6?",
                 "[/INST]")
    check_row(tok, out, 0, prompt, ids(tok, " 11", "</s>"), ids(tok, " Twelve, I think.", "</s>"))
    # The template's </s> ends the response; no second EOS is appended.
    assert out["chosen_ids"][0][-2:] != [tok.eos_token_id] * 2


def test_gemma2_multi_turn(toks, tmp_path):
    _, tok = toks["gemma2"]
    out, stats = tokenize(tok, tmp_path, [pair(TURNS)])
    assert stats.rows_kept == 1
    S, E = "<start_of_turn>", "<end_of_turn>"
    prompt = ids(tok, "<bos>", S, "user\nWhat is 3 plus 4?", E, "\n", S, "model\n7", E, "\n",
                 S, "user\nAnd 5 plus 6?", E, "\n", S, "model\n")
    check_row(tok, out, 0, prompt, ids(tok, "11", E, "\n"), ids(tok, "Twelve, I think.", E, "\n"))
    # Gemma's EOS is <eos>, not <end_of_turn>: a conversational response still gets no EOS appended.
    assert tok.eos_token_id not in out["chosen_ids"][0] + out["rejected_ids"][0]


def test_gemma3_folds_system_into_first_user_turn(toks, tmp_path):
    _, tok = toks["gemma3"]
    out, _ = tokenize(tok, tmp_path, [pair([SYSTEM, *TURNS])])
    S, E = "<start_of_turn>", "<end_of_turn>"
    prompt = ids(tok, "<bos>", S, "user\nYou are terse.\n\nWhat is 3 plus 4?", E, "\n", S, "model\n7", E, "\n",
                 S, "user\nAnd 5 plus 6?", E, "\n", S, "model\n")
    check_row(tok, out, 0, prompt, ids(tok, "11", E, "\n"), ids(tok, "Twelve, I think.", E, "\n"))


# ---------------------------------------------------------------- rows a template refuses or cannot separate

def test_gemma2_system_message_is_one_line(toks, run_cli, tmp_path):
    path, _ = toks["gemma2"]
    f = write_jsonl(tmp_path / "chat.jsonl", [pair(TURNS), pair([SYSTEM, *TURNS])])
    one_line_error(run_cli("data", "check", f, "--model", path), "chat.jsonl", "row 2", "column 'prompt'",
                   "System role not supported")


def test_mistral_non_alternating_roles_is_one_line(toks, run_cli, tmp_path):
    path, _ = toks["mistral"]
    f = write_jsonl(tmp_path / "chat.jsonl", [pair(TURNS), pair([TURNS[0], TURNS[2]])])
    one_line_error(run_cli("data", "check", f, "--model", path), "chat.jsonl", "row 2", "column 'prompt'",
                   "conversation roles must alternate user/assistant")


@pytest.mark.parametrize("name,rows,bad_row", [
    # Mistral v0.3 puts the system message into the *last* user turn: once the answer follows, it is dropped.
    ("mistral", [pair(TURNS[:1]), pair([SYSTEM, *TURNS])], 2),
    # R1-style: the generation prompt opens <think>, the rendered answer does not have one.
    ("r1", [pair(TURNS)], 1),
])
def test_template_that_cannot_separate_prompt_and_response_is_refused(toks, run_cli, tmp_path, name, rows, bad_row):
    path, tok = toks[name]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    err = one_line_error(run_cli("data", "check", f, "--model", path), "chat.jsonl", f"row {bad_row}",
                         "column 'chosen'", "chat template", "renders every prefix", "pre-render")
    assert "<think>" in err if name == "r1" else "You are terse." in err  # where the two renderings part
    with pytest.raises(UserError, match=f"row {bad_row}"):
        tokenize(tok, tmp_path, rows)


def test_pre_rendered_plain_text_is_the_way_out(toks, tmp_path):
    """What the refusal tells Mistral users to do: render the prompt themselves, end each answer with </s>."""
    _, tok = toks["mistral"]
    system_turn = "[INST] You are terse.\n\nAnd 5 plus 6?[/INST]"
    prompt = "<s>[INST] What is 3 plus 4?[/INST] 7</s>" + system_turn
    out, _ = tokenize(tok, tmp_path, [{"prompt": prompt, "chosen": " 11</s>", "rejected": " Twelve, I think.</s>"}])
    want = ids(tok, "<s>", "[INST]", " What is 3 plus 4?", "[/INST]", " 7", "</s>", "[INST]",
               " You are terse.\n\nAnd 5 plus 6?", "[/INST]")
    # BOS once (the text has <s>, the post-processor would add another) and EOS once (the text ends with </s>).
    check_row(tok, out, 0, want, ids(tok, " 11", "</s>"), ids(tok, " Twelve, I think.", "</s>"))


# ---------------------------------------------------------------- end to end

def test_data_check_accepts_a_system_message_and_two_turns(toks, run_cli, tmp_path):
    path, _ = toks["llama31"]
    f = write_jsonl(tmp_path / "chat.jsonl", [pair([SYSTEM, *TURNS]), pair([SYSTEM, TURNS[0]])])
    res = run_cli("data", "check", f, "--model", path)
    assert res.exit_code == 0, res.output + res.stderr
    assert "2 read, 2 kept, 0 skipped" in res.output, res.output
