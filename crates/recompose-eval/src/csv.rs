//! A minimal RFC 4180 reader (quoted fields, doubled quotes, newlines inside quotes): enough for
//! the MMLU files, without a dependency.

/// Parses CSV text into records.
pub fn parse(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut records = vec![];
    let mut record = vec![];
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut in_quotes = false;
    let mut line = 1;
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => in_quotes = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                line += 1;
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                any = false;
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err(format!("unterminated quoted field (line {line})"));
    }
    if any {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    #[test]
    fn quoted_fields_commas_and_newlines() {
        let r = super::parse("a,\"b, c\",\"say \"\"hi\"\"\"\n\"x\ny\",2,3").unwrap();
        assert_eq!(r, vec![vec!["a", "b, c", "say \"hi\""], vec!["x\ny", "2", "3"]]);
    }

    #[test]
    fn unterminated_quote_is_an_error() {
        assert!(super::parse("a,\"b").is_err());
    }
}
