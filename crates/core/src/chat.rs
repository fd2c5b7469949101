//! Chat templates: the model's Jinja template, rendered with minijinja the way
//! transformers renders it (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`, `strftime_now`).

use minijinja::{context, Environment, ErrorKind, Value};

use crate::error::{Error, Result};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts the template may print.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates call Python string methods (`.strip()`, `.startswith()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            // Dates in templates ("Today is ...") come from the server's clock.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            format_unix_date(now, &fmt)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Tokenizer {
                path: "chat template".into(),
                message: format!("cannot compile: {e}"),
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// Renders `messages` (a list of `{role, content, ...}` objects). `tools` and
    /// `tool_choice` are passed to the template as they are (`None` is undefined there).
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        tool_choice: Option<&serde_json::Value>,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => tools.map(Value::from_serialize),
            tool_choice => tool_choice.map(Value::from_serialize),
        })
        .map_err(|e| Error::Tokenizer {
            path: "chat template".into(),
            message: match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("template error").to_string(),
                _ => format!("cannot render: {e}"),
            },
        })
    }
}

/// `strftime` for the few directives chat templates use (`%d %b %Y`, `%Y-%m-%d`, ...).
fn format_unix_date(secs: i64, fmt: &str) -> String {
    let days = secs.div_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let msgs = serde_json::json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
        assert_eq!(
            t.render(&msgs, true, None, None).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}",
            None,
            None,
        )
        .unwrap();
        let ok = serde_json::json!([{"role": "user", "content": "  hi  "}]);
        assert_eq!(t.render(&ok, false, None, None).unwrap(), "HI");
        let bad = serde_json::json!([{"role": "assistant", "content": "x"}]);
        assert_eq!(
            t.render(&bad, false, None, None).unwrap_err().to_string(),
            "tokenizer chat template: first must be user"
        );
    }

    #[test]
    fn dates_format() {
        assert_eq!(format_unix_date(1_764_460_800, "%d %b %Y"), "30 Nov 2025");
        assert_eq!(format_unix_date(0, "%Y-%m-%d"), "1970-01-01");
    }
}
