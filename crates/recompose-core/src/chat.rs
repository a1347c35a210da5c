//! Chat templates: the model's own Jinja template rendered with minijinja.

use crate::error::{Error, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A template is code from the model file, and a request's messages are its input, so rendering is
/// bounded: instructions (minijinja's fuel: nested loops over `range(100000)` end in well under a
/// second instead of never), nesting depth, and output (text past what any context could hold is
/// an error, not gigabytes in memory).
pub const TEMPLATE_FUEL: u64 = 2_000_000;
pub const TEMPLATE_RECURSION: usize = 100;
/// Output allowed beyond four times the messages' own size (room for tool definitions and markup).
pub const TEMPLATE_OUTPUT_BASE: usize = 4 << 20;
/// The largest width a filter may be asked for: `indent(10**10)`, `tojson(indent=10**10)` and a
/// printf width of `format` each size one allocation before any output is written.
pub const TEMPLATE_MAX_WIDTH: i64 = 1024;

/// The builtin filter `name` behind a check that no width it is given is over the limit.
fn bounded_filter(env: &mut minijinja::Environment, name: &'static str, builtin: minijinja::Value) {
    use minijinja::value::{Rest, Value, ValueKind};
    fn too_wide(v: &Value) -> bool {
        match v.kind() {
            ValueKind::Number => v.as_i64().is_none_or(|n| n > TEMPLATE_MAX_WIDTH),
            // A printf width: any run of digits in the format string.
            ValueKind::String => v.as_str().is_some_and(|s| {
                s.split(|c: char| !c.is_ascii_digit())
                    .any(|d| d.parse::<i64>().map_or(!d.is_empty(), |n| n > TEMPLATE_MAX_WIDTH))
            }),
            // Keyword arguments (`width=`, `indent=`).
            ValueKind::Map => v.try_iter().into_iter().flatten().any(|k| v.get_item(&k).is_ok_and(|x| too_wide(&x))),
            _ => false,
        }
    }
    env.add_filter(name, move |state: &minijinja::State, args: Rest<Value>| {
        // Widths are the arguments after the value filtered; for format, in the format string.
        let sized = if name == "format" { args.get(..1) } else { args.get(1..) }.unwrap_or_default();
        if sized.iter().any(too_wide) {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("{name}: a width over {TEMPLATE_MAX_WIDTH}"),
            ));
        }
        builtin.call(state, &args)
    });
}

/// Renders `messages` with `template`, ending with the assistant prompt when asked.
pub fn render(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(TEMPLATE_RECURSION);
    bounded_filter(&mut env, "indent", minijinja::Value::from_function(minijinja::filters::indent));
    bounded_filter(&mut env, "tojson", minijinja::Value::from_function(minijinja::filters::tojson));
    bounded_filter(&mut env, "format", minijinja::Value::from_function(minijinja::filters::format));
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let err = |e: minijinja::Error| match e.kind() {
        minijinja::ErrorKind::OutOfFuel => {
            Error::ChatTemplate(format!("the template ran more than {TEMPLATE_FUEL} instructions (a runaway loop?)"))
        }
        _ => Error::ChatTemplate(e.to_string()),
    };
    env.add_template("chat", template).map_err(err)?;
    let tmpl = env.get_template("chat").map_err(err)?;
    let input: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
    let limit = TEMPLATE_OUTPUT_BASE.saturating_add(input.saturating_mul(4));
    let mut out = Bounded { buf: vec![], limit, overflowed: false };
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
    };
    let rendered = tmpl.render_captured_to(ctx, &mut out).map(drop);
    match rendered {
        Ok(_) => String::from_utf8(out.buf).map_err(|_| Error::ChatTemplate("the output is not UTF-8".into())),
        Err(_) if out.overflowed => {
            Err(Error::ChatTemplate(format!("the template wrote more than {limit} bytes for this conversation")))
        }
        Err(e) => Err(err(e)),
    }
}

/// A byte sink that refuses to grow past `limit` (the failed write stops rendering).
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
    /// Tells the caller's error apart from the template's own.
    overflowed: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml() {
        let t = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let out = render(t, &[Message { role: "user".into(), content: "hi".into() }], true, "", "").unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn template_errors_are_reported() {
        let e = render("{{ raise_exception('no system role') }}", &[], false, "", "").unwrap_err();
        assert!(e.to_string().contains("no system role"));
    }

    #[test]
    fn a_runaway_template_loop_is_stopped_by_fuel() {
        let t = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
        let start = std::time::Instant::now();
        let e = render(t, &[], false, "", "").unwrap_err().to_string();
        assert!(e.contains("instructions"), "{e}");
        assert!(start.elapsed().as_secs() < 30, "fuel must end the loop");
    }

    #[test]
    fn gigabytes_of_template_output_are_refused() {
        // 100,000 x 100 MB would be 10 TB; the first write past the limit ends it.
        let t = "{% set s = 'x' * 100000000 %}{% for a in range(100000) %}{{ s }}{% endfor %}";
        let e = render(t, &[], false, "", "").unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }

    /// Found in minijinja's own tracker (#924): a width sizes one allocation, so indent(10**10)
    /// asked for 10 GB at once and aborted the process.
    #[test]
    fn huge_filter_widths_are_refused_before_allocating() {
        for t in [
            "{{ 'a\nb'|indent(10000000000) }}",
            "{{ 'a\nb'|indent(width=10000000000) }}",
            "{{ messages|tojson(indent=10000000000) }}",
            "{{ '%10000000000s'|format('x') }}",
        ] {
            let e = render(t, &[], false, "", "").unwrap_err().to_string();
            assert!(e.contains("a width over"), "{t}: {e}");
        }
        // Ordinary widths still work.
        let out =
            render("{{ 'a\nb'|indent(2) }}|{{ [1]|tojson(indent=2) }}|{{ '%3s'|format(5000) }}", &[], false, "", "");
        assert_eq!(out.unwrap(), "a\n  b|[\n  1\n]|5000");
    }

    #[test]
    fn deep_template_recursion_is_an_error() {
        let t = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        let e = render(t, &[], false, "", "").unwrap_err().to_string();
        assert!(e.contains("recursion"), "{e}");
    }
}
