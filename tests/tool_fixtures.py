"""A tiny checkpoint that speaks Gemma 4's tool and thinking format: its tokenizer holds the format's special
tokens (at small ids; the released tokenizer has ``<|"|>`` at 52, ``<|tool_response>`` at 50, ``<|think|>`` at 98)
and its chat template, written here in the same format:

- a system turn when there is a system message, tools or thinking: ``<|think|>`` first when ``enable_thinking``,
  then the system text, then one ``<|tool>declaration:NAME{description:...,parameters:{...}}<tool|>`` per tool;
- an assistant turn is ``<|turn>model\\n`` + its text + its calls ``<|tool_call>call:NAME{...}<tool_call|>``;
  tool results follow inside the same model turn as ``<|tool_response>response:NAME{value:<|"|>...<|"|>}
  <tool_response|>`` and the turn stays open for the model to go on (no new generation prompt after them; the
  assistant message after them continues that turn);
- values are written in the call syntax (bare keys, strings between ``<|"|>``), as ``blockdiff.tools.syntax.dumps``.
"""

from __future__ import annotations

from fixtures import make_checkpoint, write_tokenizer

TOOL_TOKENS = {46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 51: "<tool_response|>",
               52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>"}

GEMMA4_TOOLS_TEMPLATE = r"""{%- macro val(v) -%}
{%- if v is string -%}<|"|>{{ v }}<|"|>
{%- elif v is sameas true -%}true
{%- elif v is sameas false -%}false
{%- elif v is none -%}null
{%- elif v is mapping -%}{{ '{' }}{%- for k, x in v.items() -%}{{ k }}:{{ val(x) }}{{ ',' if not loop.last }}{%- endfor -%}{{ '}' }}
{%- elif v is iterable -%}[{%- for x in v -%}{{ val(x) }}{{ ',' if not loop.last }}{%- endfor -%}]
{%- else -%}{{ v }}
{%- endif -%}
{%- endmacro -%}
{{ bos_token }}
{%- set thinking = enable_thinking | default(false) -%}
{%- set first = messages[0] if messages else none -%}
{%- set has_system = first is not none and first['role'] in ['system', 'developer'] -%}
{%- if has_system or tools or thinking -%}
<|turn>system
{% if thinking %}<|think|>{% endif %}
{%- if has_system %}{{ first['content'] | trim }}{% endif %}
{%- for t in tools or [] -%}
<|tool>declaration:{{ t['function']['name'] }}{{ val({'description': t['function']['description'] | default(''), 'parameters': t['function']['parameters'] | default({})}) }}<tool|>
{%- endfor -%}
<turn|>
{% endif -%}
{%- set ns = namespace(open=false) -%}
{%- for m in messages -%}
{%- if loop.first and has_system -%}{%- continue -%}{%- endif -%}
{%- if m['role'] == 'tool' -%}
{%- if not ns.open %}{{ raise_exception('a tool message must follow an assistant message with tool_calls') }}{% endif -%}
<|tool_response>response:{{ m['name'] | default('unknown') }}{{ val({'value': m['content']}) }}<tool_response|>
{%- else -%}
{%- if ns.open and m['role'] != 'assistant' %}<turn|>
{% set ns.open = false %}{% endif -%}
{%- if m['role'] == 'assistant' -%}
{%- if not ns.open %}<|turn>model
{% endif -%}
{{ (m['content'] or '') | trim }}
{%- for c in m['tool_calls'] or [] -%}
<|tool_call>call:{{ c['function']['name'] }}{{ val(c['function']['arguments']) }}<tool_call|>
{%- endfor -%}
{%- if m['tool_calls'] %}{% set ns.open = true %}{% else %}<turn|>
{% set ns.open = false %}{% endif -%}
{%- elif m['role'] in ['user', 'system', 'developer'] -%}
<|turn>{{ 'user' if m['role'] == 'user' else 'system' }}
{{ m['content'] | trim }}<turn|>
{% else -%}
{{ raise_exception('unknown role ' ~ m['role']) }}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not ns.open %}<|turn>model
{% endif -%}
"""


def make_tool_checkpoint(path, **kwargs) -> str:
    """``make_checkpoint`` with the tool tokens in its tokenizer and ``GEMMA4_TOOLS_TEMPLATE`` as its template."""
    path = make_checkpoint(path, with_tokenizer=False, **kwargs)
    write_tokenizer(path, 512, chat_template=GEMMA4_TOOLS_TEMPLATE, extra_specials=TOOL_TOKENS)
    return path
