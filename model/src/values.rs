//! Value syntax shared by unit keys: systemd booleans, quoted word splitting (`Exec*=`, `Environment=`),
//! byte sizes (`MemoryMax=`) and percentages (`CPUQuota=`). Pure; errors are plain text for the caller to
//! place at `file:line`.

use std::iter::Peekable;
use std::str::Chars;

/// systemd booleans: `1 yes y true t on` / `0 no n false f off`, case-insensitive.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "t" | "on" => Some(true),
        "0" | "no" | "n" | "false" | "f" | "off" => Some(false),
        _ => None,
    }
}

/// Split a command line or `Environment=` value into words with systemd's quoting: whitespace separates
/// words; `"…"` and `'…'` group (and may appear inside a word: `a"b c"` is one word `ab c`); backslash
/// escapes `\\ \" \' \n \t \r \a \b \f \v \s` (space), `\;`, `\xNN` (ASCII) and backslash-space work inside
/// and outside quotes. An unterminated quote, a trailing backslash or an unknown escape is an error.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(words);
        }
        words.push(read_word(&mut chars, s)?);
    }
}

fn read_word(chars: &mut Peekable<Chars<'_>>, whole: &str) -> Result<String, String> {
    let mut word = String::new();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.peek().copied() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => break,
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (_, '\\') => {
                chars.next();
                word.push(unescape_one(chars, whole)?);
                continue;
            }
            (_, c) => word.push(c),
        }
        chars.next();
    }
    match quote {
        Some(q) => Err(format!("unterminated {q} quote in '{whole}'")),
        None => Ok(word),
    }
}

/// The character after a backslash (already consumed).
fn unescape_one(chars: &mut Peekable<Chars<'_>>, whole: &str) -> Result<char, String> {
    let c = chars
        .next()
        .ok_or_else(|| format!("trailing backslash in '{whole}'"))?;
    let out = match c {
        'n' => '\n',
        't' => '\t',
        'r' => '\r',
        'a' => '\x07',
        'b' => '\x08',
        'f' => '\x0c',
        'v' => '\x0b',
        's' => ' ',
        '\\' | '"' | '\'' | ';' => c,
        c if c.is_whitespace() => c,
        'x' => {
            let hex: String = chars.by_ref().take(2).collect();
            u8::from_str_radix(&hex, 16)
                .ok()
                .filter(|b| b.is_ascii() && hex.len() == 2)
                .map(char::from)
                .ok_or_else(|| format!("invalid escape '\\x{hex}' in '{whole}'"))?
        }
        other => return Err(format!("invalid escape '\\{other}' in '{whole}'")),
    };
    Ok(out)
}

/// A byte size: a number (fractions allowed) with an optional base-1024 suffix `K`, `M`, `G`, `T`
/// (an optional trailing `B` is accepted: `512MB` = `512M`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let suffix = suffix.trim_start();
    let factor: u128 = match suffix.strip_suffix('B').unwrap_or(suffix) {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown size suffix '{suffix}' (expected K, M, G or T)"
            ))
        }
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let bad_number = || format!("'{number}' is not a number");
    if int_part.is_empty() && frac_part.is_empty() || frac_part.contains('.') {
        return Err(bad_number());
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| bad_number())?
    };
    let frac_digits = &frac_part[..frac_part.len().min(12)];
    let frac: u128 = if frac_digits.is_empty() {
        0
    } else {
        frac_digits.parse().map_err(|_| bad_number())?
    };
    let denom = 10u128.pow(u32::try_from(frac_digits.len()).unwrap_or(0));
    let bytes = int
        .checked_mul(factor)
        .and_then(|b| b.checked_add(frac * factor / denom))
        .and_then(|b| u64::try_from(b).ok())
        .ok_or_else(|| format!("size '{s}' is too large"))?;
    Ok(bytes)
}

/// `NN%` as an integer percentage.
pub fn parse_percent(s: &str) -> Result<u32, String> {
    let n = s
        .trim()
        .strip_suffix('%')
        .ok_or_else(|| "expected a percentage such as 50%".to_string())?;
    n.trim()
        .parse::<u32>()
        .map_err(|_| format!("'{n}' is not a whole number of percent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        split_words(s).expect(s)
    }

    #[test]
    fn booleans() {
        for t in ["1", "yes", "Y", "true", "t", "on", "ON"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["0", "no", "n", "false", "F", "off"] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        assert_eq!(parse_bool("maybe"), None);
        assert_eq!(parse_bool(""), None);
    }

    #[test]
    fn split_plain_words() {
        assert_eq!(words("  /bin/echo  a\tb  "), vec!["/bin/echo", "a", "b"]);
        assert!(words("   ").is_empty());
    }

    #[test]
    fn split_quotes() {
        assert_eq!(
            words(r#"/bin/sh -c "echo 'hi there'""#),
            vec!["/bin/sh", "-c", "echo 'hi there'"]
        );
        assert_eq!(words(r#"a 'b "c" d' """#), vec!["a", "b \"c\" d", ""]);
        assert_eq!(words(r#"--opt="x y"z"#), vec!["--opt=x yz"]);
    }

    #[test]
    fn split_escapes() {
        assert_eq!(
            words(r#"a\ b "q\"x" \x41 \s \; t\tu"#),
            vec!["a b", "q\"x", "A", " ", ";", "t\tu"]
        );
        assert_eq!(words(r"'it\'s'"), vec!["it's"]);
    }

    #[test]
    fn split_errors() {
        assert!(split_words(r#"echo "open"#)
            .expect_err("bad")
            .contains("unterminated \" quote"));
        assert!(split_words("echo 'open").is_err());
        assert!(split_words("echo \\")
            .expect_err("bad")
            .contains("trailing backslash"));
        assert!(split_words(r"echo \q")
            .expect_err("bad")
            .contains("invalid escape '\\q'"));
        assert!(split_words(r"echo \xZZ").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T")
            .expect_err("big")
            .contains("too large"));
    }

    #[test]
    fn percents() {
        assert_eq!(parse_percent("50%"), Ok(50));
        assert_eq!(parse_percent("200%"), Ok(200));
        assert!(parse_percent("50").is_err());
        assert!(parse_percent("1.5%").is_err());
    }
}
