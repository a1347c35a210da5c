//! The OpenAI request bodies, read field by field so that every bad value gets a message naming
//! it, and the OpenAI error body. Unknown fields are ignored, as OpenAI's own server does.

use recompose_llm::sample::SamplingParams;
use serde_json::{json, Map, Value};

/// An error answered with an OpenAI error body.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    pub kind: &'static str,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into(), param: Some(param.into()), kind: "invalid_request_error" }
    }
    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, kind }
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}})
    }
}

/// What a request asks for, whichever endpoint it came through.
#[derive(Debug, Clone)]
pub struct Params {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub kv: Option<recompose_kv::KvSpec>,
}

/// The prompt of a completion: text or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// One chat message.
#[derive(Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub fn parse_json(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad("body", format!("invalid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad("body", "the body must be a JSON object")),
    }
}

fn num(m: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_f64().map(Some).ok_or_else(|| ApiError::bad(key, format!("'{key}' must be a number")))
        }
        Some(_) => Err(ApiError::bad(key, format!("'{key}' must be a number"))),
    }
}

fn int(m: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64().map(Some).ok_or_else(|| ApiError::bad(key, format!("'{key}' must be an integer")))
        }
        Some(_) => Err(ApiError::bad(key, format!("'{key}' must be an integer"))),
    }
}

fn boolean(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::bad(key, format!("'{key}' must be true or false"))),
    }
}

fn in_range(key: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f32, ApiError> {
    let x = v.unwrap_or(default);
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::bad(key, format!("'{key}' must be between {lo} and {hi}, got {x}")));
    }
    Ok(x as f32)
}

/// The fields both endpoints share. `chat` selects the chat names of logprobs and max tokens.
pub fn parse_params(m: &Map<String, Value>, chat: bool) -> Result<Params, ApiError> {
    let model = match m.get("model") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => return Err(ApiError::bad("model", "'model' is required")),
        Some(_) => return Err(ApiError::bad("model", "'model' must be a string")),
    };
    let max_key = if chat && m.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = match int(m, max_key)? {
        Some(n) if n < 1 => return Err(ApiError::bad(max_key, format!("'{max_key}' must be at least 1, got {n}"))),
        Some(n) => Some(n as usize),
        None => None,
    };
    if let Some(n) = int(m, "n")? {
        if n != 1 {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
    }
    let temperature = in_range("temperature", num(m, "temperature")?, 0.0, 2.0, 1.0)?;
    let top_p = in_range("top_p", num(m, "top_p")?, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::bad("top_p", "'top_p' must be above 0"));
    }
    let min_p = in_range("min_p", num(m, "min_p")?, 0.0, 1.0, 0.0)?;
    let top_k = match int(m, "top_k")? {
        Some(k) if k < 0 => return Err(ApiError::bad("top_k", "'top_k' must be >= 0")),
        Some(k) => k as usize,
        None => 0,
    };
    let seed = match int(m, "seed")? {
        Some(s) => s as u64,
        None => rand::random::<u64>(),
    };
    let presence_penalty = in_range("presence_penalty", num(m, "presence_penalty")?, -2.0, 2.0, 0.0)?;
    let frequency_penalty = in_range("frequency_penalty", num(m, "frequency_penalty")?, -2.0, 2.0, 0.0)?;
    let stop = match m.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad("stop", "'stop' must be a string or a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::bad("stop", "'stop' must be a string or a list of strings")),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop", "'stop' takes up to 4 non-empty strings"));
    }
    let logprobs = if chat {
        match boolean(m, "logprobs")? {
            Some(true) => Some(int(m, "top_logprobs")?.unwrap_or(0)),
            _ => None,
        }
    } else {
        int(m, "logprobs")?
    };
    let logprobs = match logprobs {
        Some(n) if !(0..=20).contains(&n) => {
            return Err(ApiError::bad("logprobs", "logprobs must be between 0 and 20"))
        }
        Some(n) => Some(n as usize),
        None => None,
    };
    let stream = boolean(m, "stream")?.unwrap_or(false);
    let include_usage = match m.get("stream_options") {
        Some(Value::Object(o)) => boolean(o, "include_usage")?.unwrap_or(false),
        None | Some(Value::Null) => false,
        Some(_) => return Err(ApiError::bad("stream_options", "'stream_options' must be an object")),
    };
    let kv = match m.get("kv") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse::<recompose_kv::KvSpec>()
                .map_err(|e| ApiError::bad("kv", format!("invalid kv policy: {}", e.why)))?,
        ),
        Some(_) => return Err(ApiError::bad("kv", "'kv' must be a policy string such as \"h2o:0.2\"")),
    };
    let sampling = SamplingParams { temperature, top_k, top_p, min_p, repetition_penalty: 1.0, seed };
    Ok(Params {
        model,
        max_tokens,
        sampling,
        presence_penalty,
        frequency_penalty,
        stop,
        logprobs,
        stream,
        include_usage,
        kv,
    })
}

pub fn parse_prompt(m: &Map<String, Value>) -> Result<Prompt, ApiError> {
    let bad = || ApiError::bad("prompt", "'prompt' must be a string, a list of one string, or a list of token ids");
    match m.get("prompt") {
        None | Some(Value::Null) => Err(ApiError::bad("prompt", "'prompt' is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().into()))
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
            Ok(Prompt::Ids(a.iter().filter_map(|v| v.as_u64().map(|x| x as u32)).collect()))
        }
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
            Err(ApiError::bad("prompt", "only one prompt per request is supported"))
        }
        Some(_) => Err(bad()),
    }
}

/// The chat roles of OpenAI's API; anything else is a client error, not a prompt.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub fn parse_messages(m: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(items)) = m.get("messages") else {
        return Err(ApiError::bad("messages", "'messages' is required: a list of {role, content}"));
    };
    if items.is_empty() {
        return Err(ApiError::bad("messages", "'messages' is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let at = format!("messages[{i}]");
            let role = it
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad(&at, format!("{at}.role must be a string")))?;
            if !ROLES.contains(&role) {
                return Err(ApiError::bad(&at, format!("{at}.role '{role}' is not one of {}", ROLES.join(", "))));
            }
            let content = match it.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t.to_owned()),
                        _ => Err(ApiError::bad(&at, format!("{at}.content: only text parts are supported"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                None | Some(Value::Null) => String::new(),
                Some(_) => return Err(ApiError::bad(&at, format!("{at}.content must be a string"))),
            };
            Ok(ChatMessage { role: role.to_owned(), content })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(body: &str) -> Result<Params, ApiError> {
        parse_params(&parse_json(body.as_bytes())?, false)
    }

    #[test]
    fn bad_fields_are_named() {
        for (body, param) in [
            (r#"{"model": "m", "max_tokens": "ten"}"#, "max_tokens"),
            (r#"{"model": "m", "max_tokens": -5}"#, "max_tokens"),
            (r#"{"model": "m", "temperature": 7}"#, "temperature"),
            (r#"{"model": "m", "stop": [1]}"#, "stop"),
            (r#"{"model": "m", "n": 3}"#, "n"),
            (r#"{"model": "m", "kv": "h2o:banana"}"#, "kv"),
            (r#"{"max_tokens": 3}"#, "model"),
            (r#"[1, 2]"#, "body"),
            (r#"{"model": "#, "body"),
        ] {
            let e = p(body).err().unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    /// A made-up role used to render into the prompt and get a 200.
    #[test]
    fn an_unknown_chat_role_is_a_400() {
        let m = parse_json(br#"{"messages": [{"role": "wizard", "content": "hi"}]}"#).unwrap();
        let e = parse_messages(&m).err().expect("role 'wizard' accepted");
        assert_eq!((e.status, e.param.as_deref()), (400, Some("messages[0]")));
        assert!(e.message.contains("'wizard'"), "{}", e.message);
        let m = parse_json(br#"{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}"#)
            .unwrap();
        assert_eq!(parse_messages(&m).unwrap().len(), 2);
    }

    #[test]
    fn good_request_parses() {
        let x = p(r#"{"model": "m", "max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3, "kv": "h2o:0.2", "stream": true, "stream_options": {"include_usage": true}, "logprobs": 2}"#).unwrap();
        assert_eq!(x.max_tokens, Some(5));
        assert_eq!(x.stop, vec!["\n".to_string()]);
        assert!(x.stream && x.include_usage && x.kv.is_some());
        assert_eq!(x.logprobs, Some(2));
        let m = parse_json(br#"{"prompt": [1, 2, 3]}"#).unwrap();
        assert!(matches!(parse_prompt(&m), Ok(Prompt::Ids(v)) if v == vec![1, 2, 3]));
    }
}
