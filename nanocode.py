#!/usr/bin/env python3
"""nanocode: a coding agent in one stdlib-only Python file.

Run `python3 nanocode.py` for the REPL, or `python3 nanocode.py -p "task"` (add
`--mode json` for JSON events) to run one task headless. It talks to any
OpenAI-compatible /chat/completions endpoint and works on code with tools.

Table of contents (each section opens with a numbered banner):
    1. Imports and constants
    2. Configuration         Config, settings.json, keys, providers, local probe
    3. Utilities             pure helpers: JSON, text, paths
    4. Events                the event vocabulary, cancel tokens, sinks
    5. Streaming client      SSE framing, chunk assembly, retries, one connection
    6. Tools                 registry, argument coercion, the built-in tools
    7. Context               system prompt
    8. Agent core            the one turn loop, steering and follow-up queues
    9. Front ends            headless text / JSON, the REPL
   10. CLI                   flags, main()
"""

# =============================================================================
# 1. Imports and constants
# =============================================================================

import argparse
import codecs
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

VERSION = "0.1.0"
#: the endpoint of the agent we follow, used when nothing else is configured
DEFAULT_BASE_URL = "https://opencode.ai/zen/go/v1"
DEFAULT_MODEL = "kimi-k2.6"
#: environment variables searched for an API key, in order
KEY_ENV_VARS = ("OPENCODE_API_KEY", "OPENCODE_GO_API_KEY", "OPENAI_API_KEY")
#: local servers probed when nothing is configured: (port, name)
LOCAL_SERVERS = ((11434, "Ollama"), (8080, "llama.cpp"), (1234, "LM Studio"), (8000, "vLLM"))
LOCAL_PROBE_BUDGET = 0.3
#: HTTP statuses worth another attempt
RETRY_STATUSES = frozenset([408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529])
RETRY_AFTER_CAP = 60.0
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EVENT_SCHEMA_VERSION = 1


# =============================================================================
# 2. Configuration
# =============================================================================
# Precedence: CLI flags > environment > ~/.nanocode/settings.json > defaults.


class NanocodeError(Exception):
    """Base of every error nanocode expects and reports in one line."""


class ConfigError(NanocodeError):
    """Bad flags, settings or environment."""


@dataclass(frozen=True)
class Compat:
    """Per-provider wire quirks; auto-detected from the host, overridable in settings."""

    include_usage: bool = True  # send stream_options.include_usage
    max_tokens_field: str = "max_tokens"  # or "max_completion_tokens"
    keep_reasoning: bool = True  # send reasoning_content back on assistant messages
    tool_id_style: str = ""  # "mistral": 9-character alphanumeric tool-call ids
    empty_content: bool = False  # assistant content "" (not null) beside tool calls
    images: bool = False  # the model takes image parts


#: settings.json spelling -> Compat field
COMPAT_KEYS = {"includeUsage": "include_usage", "maxTokensField": "max_tokens_field",
               "keepReasoning": "keep_reasoning", "toolIdStyle": "tool_id_style",
               "emptyContent": "empty_content", "images": "images"}

#: host substring -> compat overrides (first match wins)
HOST_COMPAT = (
    ("api.openai.com", {"max_tokens_field": "max_completion_tokens", "keep_reasoning": False}),
    ("mistral.ai", {"keep_reasoning": False, "tool_id_style": "mistral", "empty_content": True}),
    ("groq.com", {"keep_reasoning": False}),
    ("cerebras.ai", {"keep_reasoning": False}),
)
#: models that accept image parts, by name
VISION_MODEL_RE = re.compile(r"gpt-4o|gpt-4\.1|gpt-5|claude|gemini|vision|-vl|llava|pixtral|kimi-k2\.[56]|glm-4\.\dv", re.I)


@dataclass(frozen=True)
class Config:
    """Everything a run needs, built once by load_config and passed explicitly."""

    base_url: str = DEFAULT_BASE_URL  # ends before /chat/completions
    api_url: str = ""  # full /chat/completions URL, overrides base_url
    api_key: str = field(default="", repr=False)  # never printed
    key_source: str = "none"  # where the key came from, for the banner
    model: str = DEFAULT_MODEL
    provider: str = ""  # named provider from settings.json, if any
    compat: Compat = Compat()
    max_turns: int = 100
    max_tokens: int = 0  # 0: let the provider decide
    tools: tuple = ()  # active tool names; () means none
    system_prompt: str = ""  # replaces the built-in prompt when set
    append_system_prompt: str = ""
    context_files: bool = True
    quiet: bool = False
    mode: str = "text"  # "text" or "json"
    print_mode: bool = False
    save_session: bool = True
    cwd: str = "."
    home: str = "~/.nanocode"  # settings, history, sessions
    max_attempts: int = 4
    connect_timeout: float = 30.0
    idle_timeout: float = 120.0
    show_thinking: bool = True
    color: bool = True
    prices: dict = field(default_factory=dict)  # model -> {"input": $/Mtok, "output": ...}
    notes: tuple = ()  # one-line notices for the banner (e.g. local server found)

    @property
    def chat_url(self):
        """The full URL requests go to."""
        return self.api_url or self.base_url.rstrip("/") + "/chat/completions"


def read_settings(home):
    """Return settings.json from the nanocode dir as a dict ({} when absent)."""
    path = os.path.join(home, "settings.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError("cannot read %s: %s; fix or remove the file" % (path, e))
    if not isinstance(data, dict):
        raise ConfigError("%s must hold a JSON object" % path)
    return data


def detect_compat(url, model, overrides=None):
    """Compat for a URL: host defaults, then settings overrides. Example: 'https://api.mistral.ai/v1' -> mistral ids."""
    values = {"images": bool(VISION_MODEL_RE.search(model or ""))}
    host = url.split("://", 1)[-1].split("/", 1)[0].lower()
    for needle, quirks in HOST_COMPAT:
        if needle in host:
            values.update(quirks)
            break
    for key, value in (overrides or {}).items():
        name = COMPAT_KEYS.get(key, key)
        if name not in Compat.__dataclass_fields__:
            raise ConfigError("unknown compat switch %r; known: %s" % (key, ", ".join(sorted(COMPAT_KEYS))))
        values[name] = value
    return Compat(**values)


def read_opencode_key(env):
    """The OpenCode Go key from OpenCode's auth.json, or ''."""
    base = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME", os.path.expanduser("~")), ".local", "share")
    try:
        with open(os.path.join(base, "opencode", "auth.json"), encoding="utf-8") as f:
            auth = json.load(f)
    except (OSError, ValueError):
        return ""
    for name in ("opencode-go", "opencode"):
        entry = auth.get(name) if isinstance(auth, dict) else None
        if isinstance(entry, dict) and entry.get("type") == "api" and entry.get("key"):
            return entry["key"]
    return ""


def find_api_key(env, settings, base_url):
    """Return (key, source) from the environment, settings or OpenCode's auth file."""
    for name in KEY_ENV_VARS:
        if env.get(name):
            return env[name], "$" + name
    if settings.get("apiKey"):
        return settings["apiKey"], "settings.json"
    if "opencode.ai" in base_url:
        key = read_opencode_key(env)
        if key:
            return key, "opencode auth.json"
    return "", "none"


def probe_local_servers(env):
    """Ask local model servers for /v1/models in parallel; return (base_url, model, name) or None."""
    ports = LOCAL_SERVERS
    if env.get("NANOCODE_PROBE_PORTS"):  # tests and unusual setups point the probe elsewhere
        ports = tuple((int(p), "local server") for p in env["NANOCODE_PROBE_PORTS"].split(","))
    found = {}
    deadline = time.monotonic() + LOCAL_PROBE_BUDGET

    def ask(port, name):
        models = _fetch_model_list("http://127.0.0.1:%d/v1" % port, "", LOCAL_PROBE_BUDGET)
        if models is not None:
            found.setdefault("first", (port, name, models))

    threads = [threading.Thread(target=ask, args=p, daemon=True) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if "first" in found:
            break
    if "first" not in found:
        return None
    port, name, models = found["first"]
    return "http://127.0.0.1:%d/v1" % port, (models[0] if models else ""), name


def _fetch_model_list(base_url, api_key, timeout):
    """GET {base_url}/models and return the ids, or None when nothing answers."""
    import urllib.request
    req = urllib.request.Request(base_url.rstrip("/") + "/models")
    if api_key:
        req.add_header("Authorization", "Bearer " + api_key)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read(1 << 20).decode("utf-8", "replace"))
    except Exception:  # any failure means "no server here"
        return None
    items = data.get("data") if isinstance(data, dict) else data
    return [m.get("id", "") for m in items or [] if isinstance(m, dict) and m.get("id")]


def resolve_provider(model, settings, env):
    """Split 'local/qwen3' into a named provider's settings and the model id."""
    providers = settings.get("providers") or {}
    if "/" in model and model.split("/", 1)[0] in providers:
        name, model_id = model.split("/", 1)
        spec = providers[name]
        if not isinstance(spec, dict) or not spec.get("baseUrl"):
            raise ConfigError("provider %r in settings.json needs a baseUrl" % name)
        key = spec.get("apiKey", "")
        source = "settings.json providers.%s" % name if key else "none"
        if spec.get("apiKeyEnv"):
            key = env.get(spec["apiKeyEnv"], "")
            source = "$" + spec["apiKeyEnv"] if key else "none"
        return name, model_id, spec, key, source
    return "", model, None, "", ""


def parse_tool_list(value, known):
    """'none' | 'all' | 'a,b,c' -> tuple of tool names. Example: 'read,bash' -> ('read', 'bash')."""
    if value in (None, "", "all"):
        return tuple(known)
    if value == "none":
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError("unknown tool %s; available: %s" % (", ".join(unknown), ", ".join(known)))
    return names


def load_config(args, env, known_tools=()):
    """Build the one Config from parsed flags, the environment and settings.json."""
    home = env.get("NANOCODE_DIR") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".nanocode")
    settings = read_settings(home)
    model = args.model or env.get("MODEL") or settings.get("model") or ""
    provider, model, spec, key, source = resolve_provider(model, settings, env)
    notes = []
    if spec:
        base_url, api_url = spec["baseUrl"], ""
        compat_overrides = dict(settings.get("compat") or {}, **(spec.get("compat") or {}))
    else:
        base_url = args.base_url or env.get("OPENAI_BASE_URL") or settings.get("baseUrl") or ""
        api_url = env.get("OPENAI_API_URL") or settings.get("apiUrl") or ""
        key, source = find_api_key(env, settings, base_url or DEFAULT_BASE_URL)
        compat_overrides = settings.get("compat") or {}
        if not base_url and not api_url and not key:
            local = probe_local_servers(env)
            if local:
                base_url, first_model, name = local
                model = model or first_model
                notes.append("no key or endpoint configured: using %s at %s (model %s)" % (name, base_url, model or "?"))
        base_url = base_url or DEFAULT_BASE_URL
    model = model or DEFAULT_MODEL
    max_turns = args.max_turns if args.max_turns is not None else int(settings.get("maxTurns", 100))
    return Config(
        base_url=base_url, api_url=api_url, api_key=key, key_source=source, model=model,
        provider=provider, compat=detect_compat(api_url or base_url, model, compat_overrides),
        max_turns=max_turns, max_tokens=int(settings.get("maxTokens", 0) or 0),
        tools=parse_tool_list(args.tools if args.tools is not None else settings.get("tools"), known_tools),
        system_prompt=args.system_prompt or "", append_system_prompt=args.append_system_prompt or "",
        context_files=not args.no_context_files, quiet=args.quiet, mode=args.mode,
        print_mode=args.print or args.mode == "json", save_session=not args.no_session,
        cwd=os.getcwd(), home=home, max_attempts=int(settings.get("maxAttempts", 4)),
        idle_timeout=float(env.get("NANOCODE_IDLE_TIMEOUT") or settings.get("idleTimeout", 120)),
        show_thinking=env.get("SHOW_THINKING", "1") != "0",
        color=not env.get("NO_COLOR"), prices=settings.get("prices") or {}, notes=tuple(notes),
    )


# =============================================================================
# 3. Utilities
# =============================================================================

_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def dump_json(obj):
    """Deterministic compact JSON text: the same history always gives the same bytes."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def encode_json(obj):
    """JSON as UTF-8 bytes, lone UTF-16 surrogates replaced by U+FFFD."""
    text = dump_json(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE_RE.sub("\ufffd", text).encode("utf-8")


def provider_tool_name(name, taken=()):
    """A name the provider accepts (^[A-Za-z0-9_-]{1,64}$). Example: 'fs.read file' -> 'fs_read_file'."""
    if TOOL_NAME_RE.match(name) and name not in taken:
        return name
    base = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "tool"
    candidate, n = base, 2
    while candidate in taken:
        suffix = "_%d" % n
        candidate, n = base[:64 - len(suffix)] + suffix, n + 1
    return candidate


def one_line(text, limit=300):
    """Collapse whitespace and cut. Example: 'a\\n  b' -> 'a b'."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def summarize_body(body, limit=300):
    """One line for an error body: an HTML page's title/text, or the text itself."""
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    if re.search(r"<\s*(html|!doctype|body|head)\b", text[:2000], re.I):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
        stripped = re.sub(r"<(script|style)\b.*?</\1>|<[^>]+>", " ", text, flags=re.I | re.S)
        text = "HTML error page: " + (title.group(1) if title else stripped)
    return one_line(text, limit)


def error_message_from(data):
    """The provider's message in an {"error": ...} object. Example: {'error': {'message': 'x'}} -> 'x'."""
    err = data.get("error") if isinstance(data, dict) else data
    if isinstance(err, dict):
        msg = err.get("message") or err.get("msg") or err.get("detail") or dump_json(err)
        code = err.get("code") or err.get("type")
        return "%s (%s)" % (msg, code) if code and str(code) not in str(msg) else str(msg)
    return str(err)


def resolve_path(cwd, path):
    """Absolute path for a tool argument: ~ expands, relative paths join the working directory."""
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(str(path))))


def tail_lines(text, max_lines, max_bytes):
    """The end of text within both limits; returns (tail, was_cut)."""
    cut = False
    if len(text) > max_bytes:
        text, cut = text[-max_bytes:], True
        text = text.split("\n", 1)[1] if "\n" in text else text
    lines = text.split("\n")
    if len(lines) > max_lines:
        text, cut = "\n".join(lines[-max_lines:]), True
    return text, cut


# =============================================================================
# 4. Events
# =============================================================================
# Every front end consumes the same events (dicts with a "type"), emitted by the
# one agent loop: session, turn_start, reasoning_delta, text_delta, message_end,
# tool_start, tool_update, tool_end, retry, error, agent_end (schema in README).


class Cancel:
    """An abort signal: a flag plus callbacks that close sockets and kill processes."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks = []

    def is_set(self):
        """True once cancel() was called."""
        return self._event.is_set()

    def cancel(self):
        """Set the flag and run every registered callback once."""
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # a failing cleanup must not stop the others
                pass

    def on_cancel(self, fn):
        """Run fn when cancelled (at once if already); returns a function that unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return lambda: self._discard(fn)
        fn()
        return lambda: None

    def _discard(self, fn):
        with self._lock:
            if fn in self._callbacks:
                self._callbacks.remove(fn)

    def wait(self, seconds):
        """Sleep up to seconds; True when cancelled meanwhile."""
        return self._event.wait(seconds)


def json_line_sink(stream):
    """A sink that writes each event as one JSON line and flushes."""
    lock = threading.Lock()

    def emit(event):
        line = json.dumps(event, ensure_ascii=False) + "\n"
        with lock:
            try:
                stream.write(line)
            except UnicodeEncodeError:
                stream.write(_SURROGATE_RE.sub("\ufffd", line))
            stream.flush()
    return emit


# =============================================================================
# 5. Streaming client
# =============================================================================
# Wire format: POST {base}/chat/completions with "stream": true; the answer is
# an event stream (text/event-stream) of events, each a run of "data:" lines
# ended by a blank line. Each data is a chat.completion.chunk JSON object:
#   data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}
#   data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}
#   data: [DONE]
# Providers differ in every detail, so every field is optional here.


class APIError(NanocodeError):
    """A provider or transport failure, with the provider's message."""

    def __init__(self, message, status=None, retryable=False, retry_after=None):
        NanocodeError.__init__(self, message)
        self.status, self.retryable, self.retry_after = status, retryable, retry_after


_LINE_END_RE = re.compile("\r\n|\r|\n")


class SSEDecoder:
    """Incremental event-stream parser: feed() bytes, get (kind, data) events.

    kind is "message" for data events and "error" for `event: error` or a
    non-standard `error:` field. Example: b'data: 1\\n\\n' -> [('message', '1')].
    """

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""  # text after the last line end
        self._skip_lf = False  # the last feed ended in CR; a leading LF belongs to it
        self._data = []
        self._kind = "message"

    def feed(self, chunk):
        """Parse the bytes of one read; return the events they complete."""
        text = self._utf8.decode(chunk)
        if self._skip_lf and text[:1] == "\n":
            text = text[1:]
        if not text:
            return []
        self._skip_lf = text[-1] == "\r"
        lines = _LINE_END_RE.split(self._partial + text)
        self._partial = lines.pop()
        events = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self):
        """End of stream: the unterminated line and pending event are flushed."""
        events = []
        tail = self._partial + self._utf8.decode(b"", True)
        self._partial = ""
        if tail:
            self._line(tail, events)
        self._line("", events)
        return events

    def _line(self, line, events):
        if not line:  # a blank line dispatches the pending event
            if self._data or self._kind == "error":
                events.append((self._kind, "\n".join(self._data)))
            self._data, self._kind = [], "message"
            return
        if line[0] == ":":  # comment, e.g. ': keep-alive'
            return
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._kind = "error" if value.strip() == "error" else "message"
        elif name == "error":  # non-standard, seen from some proxies
            self._kind = "error"
            self._data.append(value)
        # id:, retry: and unknown fields are ignored, as the spec says


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def _partial_tag_len(text, tag):
    """Length of the longest suffix of text that starts tag. Example: ('ab</th', '</think>') -> 4."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class Reply:
    """One assistant response as assembled from a stream."""

    def __init__(self):
        self.text = ""
        self.reasoning = ""
        self.tool_calls = []  # dicts: id, name, arguments (raw text), args (parsed), error, extra
        self.finish_reason = None
        self.usage = None
        self.reasoning_details = []
        self.done = False  # saw [DONE]
        self.error = None  # provider error message
        self.truncated = False  # the stream ended early
        self.interrupted = False  # aborted by the user

    @property
    def complete(self):
        """True when the stream ended properly."""
        return not (self.error or self.truncated or self.interrupted)


class ChunkAssembler:
    """Turns chunk objects into a Reply, calling on_text/on_reasoning with deltas."""

    def __init__(self, on_text, on_reasoning, id_style=""):
        self.reply = Reply()
        self._on_text, self._on_reasoning = on_text, on_reasoning
        self._id_style = id_style
        self._by_index, self._by_id = {}, {}
        self._text, self._reasoning = [], []
        self._think = "start"  # start | think | text: where we are in <think>…</think>
        self._pending = ""  # content held back while it may be part of a tag
        self._reasoning_field_seen = False
        self._think_tag_seen = False
        self.got_output = False

    # -- chunks ---------------------------------------------------------------

    def add(self, chunk):
        """Apply one parsed chunk object."""
        if not isinstance(chunk, dict):
            raise APIError("malformed chunk from the provider: %s" % one_line(dump_json(chunk), 120))
        if chunk.get("error"):
            raise APIError("provider error: " + error_message_from(chunk))
        usage = chunk.get("usage") or (chunk.get("x_groq") or {}).get("usage")
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        usage = choice.get("usage") or usage
        if usage:
            self.reply.usage = usage  # the last one wins; never summed
        delta = choice.get("delta") or choice.get("message") or {}
        if delta:
            self._delta(delta)
        if choice.get("finish_reason"):
            self.reply.finish_reason = choice["finish_reason"]
            if choice["finish_reason"] == "error":
                raise APIError("provider error: " + (error_message_from(choice) if choice.get("error") else "the response ended with finish_reason=error"))

    def _delta(self, delta):
        for key in ("reasoning_content", "reasoning", "reasoning_text"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                self._reasoning_field_seen = True
                self._emit_reasoning(value)
                break
        if isinstance(delta.get("reasoning_details"), list):
            self.reply.reasoning_details.extend(delta["reasoning_details"])
        content = delta.get("content")
        if isinstance(content, str):
            if content:
                self._content(content)
        elif isinstance(content, list):
            self._content_parts(content)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._tool_delta(call)

    def _content_parts(self, parts):
        for part in parts:
            if isinstance(part, str):
                self._content(part)
            elif isinstance(part, dict):
                if part.get("type") in ("thinking", "reasoning"):
                    text = part.get("thinking") or part.get("reasoning") or part.get("text") or ""
                    if text:
                        self._reasoning_field_seen = True
                        self._emit_reasoning(text)
                elif isinstance(part.get("text"), str) and part["text"]:
                    self._content(part["text"])

    # -- text and <think> tags --------------------------------------------------

    def _content(self, text):
        if self._think == "text" and not self._watch_close():
            self._emit_text(text)
            return
        buf, self._pending = self._pending + text, ""
        while buf:
            if self._think == "start":
                stripped = buf.lstrip()
                if not stripped or (_THINK_OPEN.startswith(stripped) and stripped != _THINK_OPEN):
                    self._pending = buf  # whitespace or a partial '<think>': wait
                    return
                if stripped.startswith(_THINK_OPEN):
                    self._think, self._think_tag_seen, buf = "think", True, stripped[len(_THINK_OPEN):]
                else:
                    self._think = "text"
            elif self._think == "think":
                buf = self._inside_think(buf)
            else:
                buf = self._outside_think(buf)

    def _inside_think(self, buf):
        end = buf.find(_THINK_CLOSE)
        if end >= 0:
            self._emit_reasoning(buf[:end])
            self._think = "text"
            return buf[end + len(_THINK_CLOSE):].lstrip("\n")
        keep = _partial_tag_len(buf, _THINK_CLOSE)
        self._emit_reasoning(buf[:len(buf) - keep])
        self._pending = buf[len(buf) - keep:]
        return ""

    def _watch_close(self):
        # a lone </think> means the server put <think> in the prompt: text so far was reasoning
        return not self._reasoning_field_seen and not self._think_tag_seen and not self.reply.tool_calls

    def _outside_think(self, buf):
        if not self._watch_close():
            self._emit_text(buf)
            return ""
        end = buf.find(_THINK_CLOSE)
        if end >= 0:
            self._think_tag_seen = True
            moved = "".join(self._text) + buf[:end]
            self._text = []
            if moved:
                self._reasoning.append(moved)
                self._on_reasoning(moved, True)
            return buf[end + len(_THINK_CLOSE):].lstrip("\n")
        keep = _partial_tag_len(buf, _THINK_CLOSE)
        self._emit_text(buf[:len(buf) - keep])
        self._pending = buf[len(buf) - keep:]
        return ""

    def _emit_text(self, text):
        if text:
            self.got_output = True
            self._text.append(text)
            self._on_text(text)

    def _emit_reasoning(self, text):
        if text:
            self.got_output = True
            self._reasoning.append(text)
            self._on_reasoning(text, False)

    # -- tool calls -----------------------------------------------------------

    def _tool_delta(self, delta):
        self.got_output = True
        index, call_id = delta.get("index"), delta.get("id") or ""
        fn = delta.get("function") or {}
        if index is not None:
            call = self._by_index.get(index)
            if call is None or (call_id and call["id"] and call_id != call["id"]):
                call = self._new_call()
                self._by_index[index] = call
        elif call_id:
            call = self._by_id.get(call_id) or self._new_call()
        else:
            calls = self.reply.tool_calls
            call = calls[-1] if calls else self._new_call()
        if call_id and not call["id"]:
            call["id"] = call_id
            self._by_id[call_id] = call
        name = fn.get("name") or ""
        if name and name != call["name"]:
            # a re-emitted full name replaces; a fragment extends
            call["name"] = name if (not call["name"] or name.startswith(call["name"])) else call["name"] + name
        args = fn.get("arguments")
        if isinstance(args, str):
            call["parts"].append(args)
        elif args is not None:
            call["parts"].append(dump_json(args))
        if delta.get("extra_content") is not None:
            call["extra"]["extra_content"] = delta["extra_content"]

    def _new_call(self):
        call = {"id": "", "name": "", "parts": [], "extra": {}}
        self.reply.tool_calls.append(call)
        return call

    # -- end ------------------------------------------------------------------

    def finish(self):
        """Flush held-back text, parse tool arguments once, return the Reply."""
        pending, self._pending = self._pending, ""
        if pending:
            if self._think == "think":
                self._emit_reasoning(pending)
            else:
                self._emit_text(pending)
        reply = self.reply
        reply.text, reply.reasoning = "".join(self._text), "".join(self._reasoning)
        for call in reply.tool_calls:
            call["arguments"] = "".join(call.pop("parts"))
            call["args"], call["error"] = parse_tool_arguments(call["arguments"])
            call["id"] = call["id"] or synthesize_tool_id(self._id_style)
        if reply.finish_reason == "length" and any(c["error"] for c in reply.tool_calls):
            reply.truncated = True
        return reply


def parse_tool_arguments(raw):
    """Parse raw argument text; returns (dict, error). Example: '' -> ({}, None)."""
    if raw is None or not raw.strip() or raw.strip() == "null":
        return {}, None
    try:
        value = json.loads(raw)
    except ValueError as e:
        return {}, "arguments are not valid JSON (%s): %s" % (e, one_line(raw, 200))
    if not isinstance(value, dict):
        return {}, "arguments must be a JSON object, got: %s" % one_line(raw, 200)
    return value, None


_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def synthesize_tool_id(style=""):
    """A fresh tool-call id; Mistral wants exactly 9 alphanumerics."""
    if style == "mistral":
        return "".join(random.choice(_ID_CHARS) for _ in range(9))
    return "call_" + "".join(random.choice(_ID_CHARS) for _ in range(24))


def reply_to_message(reply, compat):
    """The assistant message to keep in history (OpenAI wire format)."""
    text = reply.text
    if reply.interrupted:
        text += ("\n\n" if text else "") + "[interrupted by the user]"
    msg = {"role": "assistant", "content": text or None}
    calls = [c for c in reply.tool_calls if not reply.truncated]
    if calls:
        msg["tool_calls"] = [dict({"id": c["id"], "type": "function",
                                   "function": {"name": c["name"], "arguments": c["arguments"] or "{}"}},
                                  **c["extra"]) for c in calls]
        if reply.reasoning:
            msg["reasoning_content"] = reply.reasoning
    if reply.reasoning_details:
        msg["reasoning_details"] = reply.reasoning_details
    if msg["content"] is None and not calls:
        msg["content"] = ""
    return msg


def wire_messages(messages, compat):
    """History as sent: compat rules applied, never mutating the stored messages."""
    out = []
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            msg = dict(msg)
            if not compat.keep_reasoning:
                msg.pop("reasoning_content", None)
            if msg.get("content") is None and compat.empty_content:
                msg["content"] = ""
        out.append(msg)
    return out


def chunk_from_completion(data):
    """A non-streamed chat.completion as one chunk, tool calls indexed."""
    choices = []
    for choice in data.get("choices") or []:
        message = dict(choice.get("message") or {})
        calls = message.get("tool_calls") or []
        message["tool_calls"] = [dict(c, index=i) for i, c in enumerate(calls) if isinstance(c, dict)]
        choices.append({"delta": message, "finish_reason": choice.get("finish_reason") or "stop"})
    return {"choices": choices, "usage": data.get("usage")}


def normalize_usage(usage):
    """Provider usage -> {input, output, cacheRead, total}. Example: {'prompt_tokens': 3} -> input 3."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    cache = details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or usage.get("cache_read_input_tokens") or 0
    inp = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    out = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    return {"input": inp, "output": out, "cacheRead": cache, "total": usage.get("total_tokens") or inp + out}


def parse_retry_after(value):
    """Seconds from a Retry-After header (seconds or HTTP date), capped. Example: '2' -> 2.0."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return max(0.0, min(seconds, RETRY_AFTER_CAP))


class ChatClient:
    """Streams chat completions over one persistent HTTP connection, with retries."""

    def __init__(self, config, emit):
        self.config = config
        self.emit = emit
        self.include_usage = config.compat.include_usage
        self.connections_opened = 0
        self._conn = None
        self.retry_base = float(os.environ.get("NANOCODE_RETRY_BASE_MS", "1000")) / 1000.0

    def close(self):
        """Drop the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def build_body(self, messages, tools):
        """The request body for a history and tool schemas."""
        body = {"model": self.config.model, "messages": wire_messages(messages, self.config.compat), "stream": True}
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = tools
        if self.config.max_tokens:
            body[self.config.compat.max_tokens_field] = self.config.max_tokens
        return body

    def stream(self, messages, tools, cancel, on_text, on_reasoning):
        """Send the history and return the assembled Reply, retrying transient failures."""
        attempt, usage_retried = 1, False
        while True:
            assembler = ChunkAssembler(on_text, on_reasoning, self.config.compat.tool_id_style)
            try:
                return self._attempt(self.build_body(messages, tools), assembler, cancel)
            except APIError as e:
                if cancel.is_set():
                    assembler.reply.interrupted = True
                    return assembler.finish()
                if e.status == 400 and self.include_usage and not usage_retried and "stream_options" in str(e):
                    self.include_usage, usage_retried = False, True  # remembered for the session
                    continue
                if not e.retryable or assembler.got_output or attempt >= self.config.max_attempts:
                    raise
                delay = e.retry_after if e.retry_after is not None else self._backoff(attempt)
                attempt += 1
                self.emit({"type": "retry", "attempt": attempt, "maxAttempts": self.config.max_attempts,
                           "delayMs": int(delay * 1000), "error": str(e)})
                if cancel.wait(delay):
                    assembler.reply.interrupted = True
                    return assembler.finish()

    def _backoff(self, attempt):
        base = self.retry_base * (2 ** (attempt - 1))
        return min(base + random.uniform(0, base / 2), RETRY_AFTER_CAP)

    # -- one HTTP exchange ------------------------------------------------------

    def _connection(self):
        import http.client
        if self._conn is None:
            from urllib.parse import urlsplit
            url = urlsplit(self.config.chat_url)
            if url.scheme == "https":
                import ssl
                self._conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=self.config.connect_timeout,
                                                         context=ssl.create_default_context())
            elif url.scheme == "http":
                self._conn = http.client.HTTPConnection(url.hostname, url.port, timeout=self.config.connect_timeout)
            else:
                raise APIError("unsupported URL %r: use http:// or https://" % self.config.chat_url)
            self._conn.nanocode_fresh = True
            self.connections_opened += 1
        return self._conn

    def _headers(self):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "User-Agent": "nanocode/" + VERSION}
        if self.config.api_key:
            headers["Authorization"] = "Bearer " + self.config.api_key
        return headers

    def _send(self, body):
        """POST the body; a kept-alive connection the server closed is reopened once, silently."""
        import http.client
        from urllib.parse import urlsplit
        url = urlsplit(self.config.chat_url)
        path = url.path + ("?" + url.query if url.query else "")
        for _ in range(2):
            conn = self._connection()
            fresh, conn.nanocode_fresh = conn.nanocode_fresh, False
            try:
                if conn.sock is None:
                    conn.connect()  # under the connect timeout; then the idle timeout rules
                conn.sock.settimeout(self.config.idle_timeout)
                conn.request("POST", path, body=body, headers=self._headers())
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if fresh:
                    raise APIError("connection to %s failed: %s" % (url.netloc, e), retryable=True)
            except OSError as e:
                connected = conn.sock is not None
                self.close()
                if not connected or not _is_timeout(e):
                    raise _connect_error(url.netloc, e)
                raise APIError("no answer from %s for %ds; the request was abandoned" % (url.netloc, self.config.idle_timeout))
        raise APIError("connection to %s failed" % url.netloc, retryable=True)

    def _attempt(self, body, assembler, cancel):
        import socket
        resp = self._send(encode_json(body))
        sock = self._conn.sock
        unregister = cancel.on_cancel(lambda: _shutdown(sock))
        try:
            if resp.status != 200:
                raise self._status_error(resp)
            self._read_stream(resp, assembler, cancel)
        except socket.timeout:
            self.close()
            raise APIError("no data from the provider for %ds; the request was abandoned" % self.config.idle_timeout)
        except APIError:
            self.close()
            raise
        finally:
            unregister()
        if resp.will_close:
            self.close()
        return assembler.finish()

    def _status_error(self, resp):
        raw = resp.read(1 << 20)
        try:
            message = error_message_from(json.loads(raw.decode("utf-8", "replace")))
        except ValueError:
            message = summarize_body(raw) or resp.reason
        retryable = resp.status in RETRY_STATUSES or resp.status >= 500
        return APIError("HTTP %d: %s" % (resp.status, message), status=resp.status, retryable=retryable,
                        retry_after=parse_retry_after(resp.getheader("Retry-After")))

    def _read_stream(self, resp, assembler, cancel):
        """Feed the body to the assembler; raises APIError on a cut or in-band error."""
        import http.client
        decoder, first = SSEDecoder(), True
        ctype = (resp.getheader("Content-Type") or "").lower()
        reply = assembler.reply
        try:
            while True:
                data = resp.read1(65536)
                if not data:
                    break
                if first and (ctype.startswith("application/json") or data.lstrip()[:1] == b"{"):
                    return self._read_json_body(data + resp.read(), assembler)
                first = False
                for kind, payload in decoder.feed(data):
                    self._event(kind, payload, assembler)
                    if reply.done:
                        self._drain(resp)
                        return
            for kind, payload in decoder.close():
                self._event(kind, payload, assembler)
        except (OSError, http.client.HTTPException, ValueError) as e:
            if cancel.is_set():
                reply.interrupted = True
                self.close()
                return
            if isinstance(e, OSError) and _is_timeout(e):
                raise
            self.close()
            reply.truncated = True
            if not assembler.got_output:
                raise APIError("the connection was cut before any output (%s)" % (e.__class__.__name__,), retryable=True)
            return
        if cancel.is_set():
            reply.interrupted = True
        elif not reply.done and not reply.finish_reason:
            reply.truncated = True
            self.close()
            if not assembler.got_output:
                raise APIError("the provider closed the stream before any output", retryable=True)

    def _event(self, kind, payload, assembler):
        if kind == "error":
            try:
                message = error_message_from(json.loads(payload))
            except ValueError:
                message = payload or "unknown error"
            raise APIError("provider error: " + one_line(message))
        if payload.strip() == "[DONE]":
            assembler.reply.done = True
            return
        if not payload.strip():
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise APIError("malformed stream data from the provider: %s" % one_line(payload, 120))
        assembler.add(chunk)

    def _read_json_body(self, raw, assembler):
        try:
            data = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            raise APIError("the provider answered with unreadable data: %s" % summarize_body(raw))
        if isinstance(data, dict) and data.get("error"):
            raise APIError("provider error: " + error_message_from(data))
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise APIError("unexpected answer from the provider: %s" % one_line(dump_json(data), 200))
        assembler.add(chunk_from_completion(data))
        assembler.reply.done = True

    def _drain(self, resp):
        """Read what follows [DONE] so the connection can be reused; close it when that stalls."""
        try:
            if self._conn is not None and self._conn.sock is not None:
                self._conn.sock.settimeout(1.0)
            while resp.read1(65536):
                pass
        except Exception:  # a stalled or odd tail only costs the connection, never the reply
            self.close()


def _shutdown(sock):
    """Wake a blocked read by shutting the socket down."""
    import socket
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _is_timeout(exc):
    import socket
    return isinstance(exc, socket.timeout) or "timed out" in str(exc)


def _connect_error(netloc, exc):
    if _is_timeout(exc):
        return APIError("connecting to %s timed out; check the base URL or your network" % netloc)
    return APIError("cannot connect to %s: %s" % (netloc, exc), retryable=True)


# =============================================================================
# 6. Tools
# =============================================================================
# A tool is one decorated function: @tool(name, description, **params). Params
# use a compact schema, "type" or "type?" (optional) plus a short description
# after a space, e.g. offset="integer? 1-indexed first line". Tools take a
# ToolContext and return a string (or a ToolResult); they never print, raise
# ToolError("...: try ...") for expected failures, and stream progress with
# ctx.update(text).


class ToolError(NanocodeError):
    """An expected tool failure; the message tells the model what to do next."""


@dataclass(frozen=True)
class Tool:
    """One entry of the registry."""

    name: str
    description: str
    params: dict  # name -> "type[?] description" or (json schema, optional)
    fn: object
    readonly: bool = False  # may run in parallel with other read-only calls


@dataclass
class ToolResult:
    """What a tool returns: text for the model plus details for front ends."""

    text: str
    is_error: bool = False
    details: dict = field(default_factory=dict)  # e.g. {"diff": ...} for the UI
    images: list = field(default_factory=list)  # [(mime, base64)] for vision models


TOOLS = {}  # name -> Tool, in registration order

#: argument names models trained on other agents send -> ours
ARG_ALIASES = {"file_path": "path", "filePath": "path", "filepath": "path", "file": "path",
               "cmd": "command", "pat": "pattern", "regex": "pattern", "query_string": "query",
               "old_string": "oldText", "new_string": "newText", "oldString": "oldText",
               "newString": "newText", "replaceAll": "replace_all", "case_insensitive": "ignoreCase",
               "-i": "ignoreCase", "max_results": "limit", "output_mode": "outputMode",
               "max_characters": "maxCharacters", "timeout_seconds": "timeoutSeconds",
               "num_results": "numResults", "dir": "path", "directory": "path"}


def tool(name, description, readonly=False, **params):
    """Register the decorated function as a tool."""
    def register(fn):
        TOOLS[name] = Tool(name, description, params, fn, readonly)
        return fn
    return register


def _param_spec(spec):
    """(json schema, optional) for a compact spec. Example: 'integer? first line' -> ({'type': 'integer', ...}, True)."""
    if isinstance(spec, tuple):
        return spec
    kind, _, desc = spec.partition(" ")
    optional = kind.endswith("?")
    schema = {"type": kind.rstrip("?")}
    if desc:
        schema["description"] = desc
    return schema, optional


def tool_schema(t, wire_name=None):
    """The OpenAI function schema of a tool."""
    props, required = {}, []
    for pname, spec in t.params.items():
        props[pname], optional = _param_spec(spec)
        if not optional:
            required.append(pname)
    return {"type": "function", "function": {
        "name": wire_name or t.name, "description": t.description,
        "parameters": {"type": "object", "properties": props, "required": required}}}


def _coerce(value, schema):
    """Models send numbers as strings and arrays as JSON strings: coerce to the schema's type."""
    kind = schema.get("type")
    if isinstance(value, str):
        text = value.strip()
        if kind == "integer" and re.match(r"^-?\d+$", text):
            return int(text)
        if kind == "number" and re.match(r"^-?\d+(\.\d+)?$", text):
            return float(text)
        if kind == "boolean" and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if kind in ("array", "object") and text[:1] in "[{":
            try:
                return json.loads(text)
            except ValueError:
                return value
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalize_args(t, args):
    """Map aliases, coerce types and check required arguments; returns kwargs for t.fn."""
    args = {(k if k in t.params else ARG_ALIASES.get(k, k)): v for k, v in args.items()}
    if "edits" in t.params and "edits" not in args and "oldText" in args:
        # the Claude-style single edit: old_string / new_string / replace_all
        args["edits"] = [{"oldText": args.pop("oldText"), "newText": args.pop("newText", ""),
                          "replace_all": _coerce(args.pop("replace_all", False), {"type": "boolean"})}]
    kwargs = {}
    for pname, spec in t.params.items():
        schema, optional = _param_spec(spec)
        if pname in args and args[pname] is not None:
            kwargs[pname] = _coerce(args[pname], schema)
        elif not optional:
            raise ToolError("missing required argument %r; %s takes %s" % (pname, t.name, ", ".join(t.params)))
    return kwargs


class ToolContext:
    """What a running tool may touch: cwd, config, cancel token, update sink, checkpoints."""

    def __init__(self, cwd, config=None, cancel=None, update=None, checkpoints=None, call_id=""):
        self.cwd = cwd
        self.config = config
        self.cancel = cancel or Cancel()
        self._update = update
        self.checkpoints = checkpoints
        self.call_id = call_id

    def path(self, p):
        """Resolve a path argument against the working directory."""
        return resolve_path(self.cwd, p)

    def update(self, text):
        """Stream progress (e.g. command output) to the front ends."""
        if self._update and text:
            self._update(text)

    def for_call(self, call_id, update):
        """A copy for one tool call."""
        return ToolContext(self.cwd, self.config, self.cancel, update, self.checkpoints, call_id)


def run_tool(ctx, name, args, active=None):
    """Run one tool call; the only place a tool's exception becomes an 'error:' result."""
    names = list(active if active is not None else TOOLS)
    t = TOOLS.get(name)
    if t is None or name not in names:
        return ToolResult("error: unknown tool %r; available tools: %s" % (name, ", ".join(names) or "none"), True)
    try:
        out = t.fn(ctx, **normalize_args(t, args))
    except ToolError as e:
        return ToolResult("error: %s" % e, True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a tool bug must not end the session
        return ToolResult("error: %s failed: %s: %s" % (name, e.__class__.__name__, e), True)
    if isinstance(out, ToolResult):
        return out
    return ToolResult(str(out))
