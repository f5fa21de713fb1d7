#!/usr/bin/env python3
"""Renders chat templates with Python's jinja2 the way `transformers`'
`apply_chat_template` does, for `chat_it.rs`.

    python3 chat_oracle.py CASES_JSON OUT_JSON

CASES_JSON: a list of {"template", "messages", "add_generation_prompt",
"tools", "extra", "bos_token", "eos_token", "now"}; OUT_JSON: per case
{"text": ...} or {"error": ...}. The environment is transformers' (its
`_compile_jinja_template`): an ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and the loopcontrols extension; `tojson`,
`raise_exception` and `strftime_now` as transformers defines them, except
that `strftime_now` formats the case's fixed time (`now`, Unix seconds, in
UTC) instead of the clock's, so both renders see the same instant.
"""

import json
import sys
from datetime import datetime, timezone

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def render(case):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.fromtimestamp(case["now"], tz=timezone.utc).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(case["template"])
    variables = dict(case.get("extra") or {})
    variables.update(
        messages=case["messages"],
        add_generation_prompt=case["add_generation_prompt"],
        tools=case.get("tools"),
        bos_token=case["bos_token"],
        eos_token=case["eos_token"],
    )
    return template.render(**variables)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    out = []
    for case in cases:
        try:
            out.append({"text": render(case)})
        except jinja2.exceptions.TemplateError as e:
            out.append({"error": str(e)})
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
