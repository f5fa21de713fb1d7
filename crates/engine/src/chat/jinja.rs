//! The Python-side helpers Hugging Face chat templates call, which Jinja2
//! gets from `transformers` or from Python itself and minijinja lacks:
//! `raise_exception`, `strftime_now`, `tojson` with Python's separators,
//! and Python's string and dict methods.

use minijinja::value::{from_args, Value, ValueKind};
use minijinja::{Error, ErrorKind, State};

/// `raise_exception(msg)`: templates call it to reject a conversation
/// (e.g. roles that do not alternate); the message reaches the caller.
pub(super) fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as `transformers` defines it: Python's `json.dumps` with
/// `ensure_ascii = False`, so `", "` and `": "` separators without `indent`,
/// and pretty printing with `indent`.
pub(super) fn tojson(
    value: Value,
    indent: Option<usize>,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, Error> {
    use serde::Serialize as _;
    // `tojson(indent=4)`, as templates write it; other keywords of
    // `transformers`' tojson (ensure_ascii, separators, sort_keys) are an
    // error naming them rather than silently ignored.
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(width) => {
            let indent_text = vec![b' '; width];
            let mut serializer = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&indent_text),
            );
            value.serialize(&mut serializer)
        }
        None => {
            let mut serializer =
                serde_json::Serializer::with_formatter(&mut out, PythonJsonFormatter);
            value.serialize(&mut serializer)
        }
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(text))
}

/// serde_json's compact output with Python's default separators.
struct PythonJsonFormatter;

/// Python's item separator before every element but the first.
fn python_separator<W: ?Sized + std::io::Write>(
    writer: &mut W,
    first: bool,
) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonJsonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Python methods that Hugging Face chat templates call on strings and
/// dicts, which Jinja2 gets from Python and minijinja does not have:
/// `strip`/`lstrip`/`rstrip` (optional chars), `startswith`, `endswith`,
/// `upper`, `lower`, `title`, `capitalize`, `split` (optional separator and
/// maxsplit), `replace`; `items`, `keys`, `values`, `get`.
pub(super) fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    if let (ValueKind::String, Some(text)) = (value.kind(), value.as_str()) {
        return match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                let strip_char = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
                let stripped = match method {
                    "strip" => text.trim_matches(strip_char),
                    "lstrip" => text.trim_start_matches(strip_char),
                    _ => text.trim_end_matches(strip_char),
                };
                Ok(Value::from(stripped))
            }
            "startswith" => {
                let (prefix,): (&str,) = from_args(args)?;
                Ok(Value::from(text.starts_with(prefix)))
            }
            "endswith" => {
                let (suffix,): (&str,) = from_args(args)?;
                Ok(Value::from(text.ends_with(suffix)))
            }
            "upper" => {
                let () = from_args(args)?;
                Ok(Value::from(text.to_uppercase()))
            }
            "lower" => {
                let () = from_args(args)?;
                Ok(Value::from(text.to_lowercase()))
            }
            "title" | "capitalize" => {
                let () = from_args(args)?;
                state.apply_filter(method, std::slice::from_ref(value))
            }
            "split" => {
                let (separator, max_split): (Option<&str>, Option<i64>) = from_args(args)?;
                // Python: a negative or missing maxsplit means no limit.
                let limit = max_split
                    .and_then(|n| usize::try_from(n).ok())
                    .map(|n| n + 1);
                let parts: Vec<Value> = match (separator, limit) {
                    (Some(""), _) => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "split: empty separator",
                        ))
                    }
                    (Some(sep), Some(limit)) => text.splitn(limit, sep).map(Value::from).collect(),
                    (Some(sep), None) => text.split(sep).map(Value::from).collect(),
                    (None, limit) => python_whitespace_split(text, limit)
                        .into_iter()
                        .map(Value::from)
                        .collect(),
                };
                Ok(Value::from(parts))
            }
            "replace" => {
                let (old, new): (&str, &str) = from_args(args)?;
                Ok(Value::from(text.replace(old, new)))
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        };
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                let () = from_args(args)?;
                state.apply_filter("items", std::slice::from_ref(value))
            }
            "keys" => {
                let () = from_args(args)?;
                Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
            }
            "values" => {
                let () = from_args(args)?;
                let values = value
                    .try_iter()?
                    .map(|key| value.get_item(&key))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Ok(Value::from(values))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let item = value.get_item(&key)?;
                Ok(if item.is_undefined() {
                    default.unwrap_or(Value::from(()))
                } else {
                    item
                })
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(Error::from(ErrorKind::UnknownMethod))
}

/// Python's `str.split()` without a separator: runs of whitespace separate,
/// leading and trailing whitespace yield no empty parts; with a limit of `n`
/// parts the last part keeps the rest of the text (left-stripped).
pub(super) fn python_whitespace_split(text: &str, limit: Option<usize>) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        if limit.is_some_and(|n| parts.len() + 1 >= n) {
            parts.push(rest);
            break;
        }
        match rest.find(char::is_whitespace) {
            Some(end) => {
                parts.push(&rest[..end]);
                rest = rest[end..].trim_start();
            }
            None => {
                parts.push(rest);
                break;
            }
        }
    }
    parts
}

/// `strftime_now(format)` as `transformers` defines it
/// (`datetime.now().strftime(format)`), in UTC: `unix_seconds` is the
/// render's time. A format chrono cannot read is a render error, not a
/// panic.
pub(super) fn strftime_at(unix_seconds: i64, format: &str) -> Result<Value, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(format).collect();
    if items.iter().any(|item| matches!(item, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        ));
    }
    let at = chrono::DateTime::from_timestamp(unix_seconds, 0).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: time {unix_seconds} is out of range"),
        )
    })?;
    Ok(Value::from(
        at.format_with_items(items.into_iter()).to_string(),
    ))
}
