"""The Qwen3 chat format: rendering, loss masks, and the Jinja template users get.

Qwen3 formats a conversation as ChatML turns, `<|im_start|>{role}\\n{content}<|im_end|>\\n`.
What makes it Qwen3 rather than plain ChatML is how reasoning is placed:

- the assistant turns after the last real user query carry their reasoning as
  `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`; the final turn always has the block, so a
  non-thinking answer keeps an empty one, `<think>\\n\\n</think>\\n\\n`;
- assistant turns earlier in the history lose their reasoning (only the answer stays);
- tool calls are `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` inside the
  assistant turn, and tool results are grouped into one user turn of
  `<tool_response>\\n...\\n</tool_response>` blocks;
- the generation prompt is `<|im_start|>assistant\\n`, plus the empty think block when
  thinking is switched off.

Two implementations of the same format live here on purpose: `render` (Python, which
also knows which characters are assistant output, for the loss mask) and CHAT_TEMPLATE
(Jinja, saved into the tokenizer directory so `tokenizer.apply_chat_template` works for
users and for inference servers). tests/test_chat.py holds them to the same token ids.

Messages are HF-style dicts: {"role": "system"|"user"|"assistant"|"tool", "content": str,
"reasoning_content": str (assistant, optional), "tool_calls": [{"name", "arguments"} or
{"function": {...}}] (assistant, optional)}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# The Qwen3 report's (section 4.3) instruction for ending the thinking early when the
# thinking budget is spent; the generation helper inserts it verbatim.
BUDGET_STOP = ("Considering the limited time by the user, I have to give the solution based on the "
               "thinking directly now.\n</think>.\n\n")
EMPTY_THINK = "<think>\n\n</think>\n\n"
THINK_FLAG, NO_THINK_FLAG = "/think", "/no_think"
ROLES = ("system", "user", "assistant", "tool")

_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")

# Keep in step with `render` below; tests/test_chat.py compares them token by token.
CHAT_TEMPLATE = r"""
{%- set first_is_system = messages and messages[0].role == 'system' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if first_is_system %}{{ messages[0].content + '\n\n' }}{% endif -%}
{{- TOOLS_INTRO -}}
{%- for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor -%}
{{- TOOLS_OUTRO + '<|im_end|>\n' -}}
{%- elif first_is_system -%}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- endif -%}
{%- set state = namespace(last_query=messages | length - 1, found=false) -%}
{%- for i in range(messages | length - 1, -1, -1) -%}
{%- set m = messages[i] -%}
{%- if not state.found and m.role == 'user' and m.content is string
      and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) -%}
{%- set state.found = true -%}
{%- set state.last_query = i -%}
{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
{%- set content = m.content if m.content is string else '' -%}
{%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
{{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' -}}
{%- elif m.role == 'assistant' -%}
{%- set reasoning = '' -%}
{%- if m.reasoning_content is string -%}
{%- set reasoning = m.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- if loop.index0 > state.last_query and (loop.last or reasoning) -%}
{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
{%- else -%}
{{- content -}}
{%- endif -%}
{%- for call in (m.tool_calls or []) -%}
{%- if content or not loop.first %}{{ '\n' }}{% endif -%}
{%- set call = call.function if call.function else call -%}
{{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
{{- call.arguments if call.arguments is string else call.arguments | tojson -}}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif m.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif -%}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif -%}
{%- endif -%}
""".strip().replace("TOOLS_INTRO", json.dumps(_TOOLS_INTRO)).replace("TOOLS_OUTRO", json.dumps(_TOOLS_OUTRO))


@dataclass
class Rendered:
    text: str
    # [start, end) character ranges of assistant output: what SFT trains on
    loss_spans: list[tuple[int, int]]


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _is_tool_response(content: str) -> bool:
    return content.startswith("<tool_response>") and content.endswith("</tool_response>")


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer): from reasoning_content, else from a `<think>...</think>` prefix."""
    content = _text(message.get("content"))
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"], content
    if "</think>" in content:
        # As the template does: reasoning before the first </think>, answer after the last.
        parts = content.split("</think>")
        return parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), parts[-1].lstrip("\n")
    return "", content


def _tool_call_text(call: dict) -> str:
    fn = call.get("function") or call
    args = fn.get("arguments")
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{fn.get("name")}", "arguments": {args}}}\n</tool_call>'


def last_query_index(messages: list[dict]) -> int:
    """Index of the last user turn that is a real query (not wrapped tool output)."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.get("role") == "user" and isinstance(m.get("content"), str) and not _is_tool_response(m["content"]):
            return i
    return len(messages) - 1


def render(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
           enable_thinking: bool = True) -> Rendered:
    """The conversation as Qwen3 text, with the assistant spans that carry loss.

    An assistant turn's loss span is its output after `<|im_start|>assistant\\n`: think
    block, answer, tool calls and the closing `<|im_end|>`; the newline after it is not
    output (the next turn's prompt starts there).
    """
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    size = 0

    def emit(piece: str, loss: bool = False) -> None:
        nonlocal size
        if loss and piece:
            spans.append((size, size + len(piece)))
        out.append(piece)
        size += len(piece)

    first_is_system = bool(messages) and messages[0].get("role") == "system"
    if tools:
        system = _text(messages[0].get("content")) + "\n\n" if first_is_system else ""
        listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        emit(f"<|im_start|>system\n{system}{_TOOLS_INTRO}{listed}{_TOOLS_OUTRO}<|im_end|>\n")
    elif first_is_system:
        emit(f"<|im_start|>system\n{_text(messages[0].get('content'))}<|im_end|>\n")

    last_query = last_query_index(messages)
    for i, m in enumerate(messages):
        role, content = m.get("role"), _text(m.get("content"))
        if role == "user" or (role == "system" and i > 0):
            emit(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            reasoning, answer = split_reasoning(m)
            emit("<|im_start|>assistant\n")
            is_last = i == len(messages) - 1
            if i > last_query and (is_last or reasoning):
                body = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}"
            else:
                body = answer
            for j, call in enumerate(m.get("tool_calls") or []):
                body += ("\n" if answer or j else "") + _tool_call_text(call)
            emit(body + "<|im_end|>", loss=True)
            emit("\n")
        elif role == "tool":
            opens = i == 0 or messages[i - 1].get("role") != "tool"
            closes = i == len(messages) - 1 or messages[i + 1].get("role") != "tool"
            emit(("<|im_start|>user" if opens else "") + f"\n<tool_response>\n{content}\n</tool_response>"
                 + ("<|im_end|>\n" if closes else ""))
    if add_generation_prompt:
        emit("<|im_start|>assistant\n" + ("" if enable_thinking else EMPTY_THINK))
    return Rendered("".join(out), spans)


def encode(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
           enable_thinking: bool = True) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): the ids `apply_chat_template` gives, and 1 on assistant output.

    The whole text is tokenized at once (so ids equal the template's), and a token carries
    loss when it starts inside an assistant span.
    """
    r = render(messages, tools, add_generation_prompt, enable_thinking)
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask, k = [], 0
    for start, _ in offsets:
        while k < len(r.loss_spans) and r.loss_spans[k][1] <= start:
            k += 1
        mask.append(int(k < len(r.loss_spans) and r.loss_spans[k][0] <= start))
    return list(ids), mask


def prompt_messages(row: dict) -> list[dict]:
    """A data row's prompt as messages: its `messages` (a training conversation without its
    final assistant turn), or its `prompt` text as one user turn; ValueError for neither."""
    if isinstance(row.get("messages"), list):
        msgs = row["messages"]
        # a training conversation: prompt with everything before its final assistant turn
        return msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise ValueError("row has neither 'messages' nor 'prompt'")


def prompt_ids(tokenizer, messages: list[dict], enable_thinking: bool = True) -> list[int]:
    """The prompt's tokens in the Qwen3 chat format, ending in the generation prompt."""
    return tokenizer.encode(render(messages, add_generation_prompt=True, enable_thinking=enable_thinking).text,
                            add_special_tokens=False)


def problem(messages) -> str | None:
    """Why a training conversation is unusable (a short reason key), or None if it is fine."""
    if not isinstance(messages, list) or not messages:
        return "no_messages"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return "bad_role"
        if m["role"] != "assistant" and not isinstance(m.get("content"), str):
            return "missing_content"
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        return "no_assistant_turn"
    for m in assistants:
        reasoning, answer = split_reasoning(m)
        if not answer.strip() and not reasoning.strip() and not m.get("tool_calls"):
            return "empty_assistant_turn"
    if messages[-1]["role"] != "assistant":
        return "does_not_end_with_assistant"
    return None
