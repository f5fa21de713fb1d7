"""The official `openai` Python SDK as the client of a shardvisor node.

Run by `openai_sdk::the_official_sdk_works_unchanged` (crates/node/tests/it)
against a pipeline-2 SmolLM2 instance:

    python3 openai_sdk.py BASE_URL MODEL_NAME INSTANCE_ID

Every check uses the SDK's own types and exceptions: a response the SDK
cannot parse, or an error of the wrong class or code, fails the script with
a message. Exits 0 and prints "openai sdk: N checks passed" when all hold.
"""

import json
import sys
import time
import urllib.request

import openai

base, name, instance = sys.argv[1:4]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        sys.exit(f"FAILED: {what}")
    checks += 1


def greedy(**kw):
    return client.chat.completions.create(model=name, temperature=0, **kw)


PARIS = [{"role": "user", "content": "What is the capital of France?"}]

# models.list: the model's name and the instance id, no path in owned_by.
models = {m.id: m for m in client.models.list()}
check(name in models and instance in models, f"models.list has {name!r} and {instance!r}: {list(models)}")
check(all("/" not in m.owned_by for m in models.values()), "owned_by holds no path")
check(client.models.retrieve(name).id == name, "models.retrieve by name")

# Non-streamed and streamed greedy chats agree; the model may be named by
# its name or its instance id.
plain = greedy(messages=PARIS, max_completion_tokens=12)
text = plain.choices[0].message.content
check(plain.object == "chat.completion" and text, f"a chat answer: {plain}")
check(plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 0, f"usage: {plain.usage}")
by_id = client.chat.completions.create(model=instance, messages=PARIS, max_tokens=12, temperature=0)
check(by_id.choices[0].message.content == text, "the instance id serves the same model")
chunks = list(greedy(messages=PARIS, max_completion_tokens=12, stream=True))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(streamed == text, f"streamed {streamed!r} == non-streamed {text!r}")
check(all(c.usage is None for c in chunks), "no usage chunk unless asked")
check(chunks[-1].choices[0].finish_reason in ("stop", "length"), "the last chunk finishes")

# stream_options.include_usage: a last chunk with empty choices and usage.
chunks = list(greedy(messages=PARIS, max_tokens=12, stream=True, stream_options={"include_usage": True}))
last = chunks[-1]
check(last.choices == [] and last.usage is not None, f"a final usage chunk: {last}")
check(last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens, "usage adds up")
check(last.usage.completion_tokens == plain.usage.completion_tokens, "the same completion length")

# Content as a list of text parts, multi-turn with a system message.
parts = greedy(
    messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
    max_tokens=12,
)
check(parts.choices[0].message.content == text, "content parts render like a string")
multi = greedy(
    messages=[
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Another one?"},
    ],
    max_tokens=8,
)
check(multi.choices[0].message.content, "a multi-turn answer")

# stop: the answer ends before the stop string, finish_reason stop.
word = text.split()[1] if len(text.split()) > 1 else text[:2]
stopped = greedy(messages=PARIS, max_tokens=12, stop=[word])
check(word not in stopped.choices[0].message.content, f"{word!r} stops the answer")
check(stopped.choices[0].finish_reason == "stop", "stopped by a stop string")
check(text.startswith(stopped.choices[0].message.content), "the stopped answer is a prefix")

# max_completion_tokens bounds the answer, finish_reason length.
short = client.chat.completions.create(
    model=name, messages=[{"role": "user", "content": "Tell me a long story."}], max_completion_tokens=5, temperature=0
)
check(short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length", f"length: {short.usage}")

# seed: the same seed samples the same answer; n choices differ by seed.
story = [{"role": "user", "content": "Write a short poem about the sea."}]
a = client.chat.completions.create(model=name, messages=story, max_tokens=16, temperature=1.0, seed=42)
b = client.chat.completions.create(model=name, messages=story, max_tokens=16, temperature=1.0, seed=42)
check(a.choices[0].message.content == b.choices[0].message.content, "the same seed, the same answer")
n3 = client.chat.completions.create(model=name, messages=story, max_tokens=16, temperature=1.0, seed=42, n=3)
check([c.index for c in n3.choices] == [0, 1, 2], f"n=3 gives indices 0..2: {n3.choices}")
check(n3.choices[0].message.content == a.choices[0].message.content, "choice 0 uses the request's seed")
check(len({c.message.content for c in n3.choices}) > 1, "choices differ")
check(3 <= n3.usage.completion_tokens <= 48 and n3.usage.prompt_tokens == a.usage.prompt_tokens,
      f"usage counts every choice, the prompt once: {n3.usage}")
try:
    client.chat.completions.create(model=name, messages=story, n=100)
    check(False, "n=100 is refused")
except openai.BadRequestError as e:
    check(e.code == "invalid_value" and e.param == "n" and "16" in e.message, f"n limit named: {e}")

# logprobs: one entry per token, spelling the answer; greedy picks the top one.
lp = greedy(messages=PARIS, max_tokens=12, logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
check("".join(t.token for t in content) == lp.choices[0].message.content, "the tokens spell the answer")
for t in content:
    check(t.logprob <= 0 and len(t.top_logprobs) == 3, f"an entry: {t}")
    check(t.top_logprobs[0].token == t.token, f"greedy takes the most likely token: {t}")
    check(abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, "its logprob is the top one")
    check(bytes(t.bytes).decode("utf-8", "replace") == t.token, "bytes carry the token")

# Penalties: a strong frequency penalty stops greedy decoding repeating
# itself; the answers differ from the unpenalised one.
rep = [{"role": "user", "content": "Repeat the word 'yes' twenty times."}]
free = greedy(messages=rep, max_tokens=24, logprobs=True)
pen = greedy(messages=rep, max_tokens=24, logprobs=True, frequency_penalty=2.0, presence_penalty=1.0)
count = lambda r: len(r.choices[0].logprobs.content) - len({t.token for t in r.choices[0].logprobs.content})
check(count(pen) < count(free), f"penalties cut repeats: {count(pen)} vs {count(free)}")

# Text completions: plain, streamed, echo.
prompt = "The capital of France is"
comp = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
check(comp.object == "text_completion" and comp.choices[0].text, f"a completion: {comp}")
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=name, prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)
check(streamed == comp.choices[0].text, f"streamed completion {streamed!r}")
echo = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, echo=True)
check(echo.choices[0].text == prompt + comp.choices[0].text, "echo prepends the prompt")
two = client.completions.create(model=name, prompt=[prompt, "Once upon a time"], max_tokens=4, temperature=0)
check([c.index for c in two.choices] == [0, 1] and two.choices[0].text == comp.choices[0].text[: len(two.choices[0].text)],
      "a list of prompts gives one choice each")
lpc = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
check("".join(lpc.choices[0].logprobs.tokens) == lpc.choices[0].text, "completion logprobs spell the text")

# Errors arrive as the SDK's own types and codes.
try:
    client.chat.completions.create(model="no-such-model", messages=PARIS)
    check(False, "an unknown model is refused")
except openai.NotFoundError as e:
    check(e.code == "model_not_found", f"model_not_found: {e}")
try:
    greedy(messages=[{"role": "user", "content": "hello " * 9000}])
    check(False, "an over-long prompt is refused")
except openai.BadRequestError as e:
    check(e.code == "context_length_exceeded", f"context_length_exceeded: {e}")
try:
    greedy(messages=PARIS, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    check(False, "tools are refused")
except openai.BadRequestError as e:
    check(e.param == "tools", f"tools refused: {e}")

# Closing a stream cancels its task: the instance has no task in flight soon
# after, though the answer had hundreds of tokens to go.
stream = client.chat.completions.create(
    model=name, messages=[{"role": "user", "content": "Tell me a very long story."}], max_tokens=2000, stream=True
)
for i, _ in enumerate(stream):
    if i == 3:
        break
stream.close()
deadline = time.time() + 20
while True:
    view = json.load(urllib.request.urlopen(f"{base}/instance/{instance}"))
    if view["tasks_in_flight"] == 0:
        break
    check(time.time() < deadline, f"the closed stream's task is cancelled: {view['tasks_in_flight']} in flight")
    time.sleep(0.05)

print(f"openai sdk: {checks} checks passed")
