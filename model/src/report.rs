//! One-line error reports for the binaries' edges: `initctl: cannot connect to init at …: No such file …`.
//!
//! Owns: turning an error and its chain of causes into the single line a binary prints before exiting 1.
//! Many of Keel's error types already name their cause in their message (`"{path}: {source}"`, so the message
//! reads well wherever it is logged) and also expose it as `source()`; printing the chain as well (anyhow's
//! `{:#}`) said every such cause twice. Here a cause is appended only when the line does not already say it.
//! Does not: decide exit codes beyond 0 / 1 (`exit`), or anything about what failed.

use std::error::Error;

/// `e` and each of its causes, joined with ": ", skipping a cause the line already contains.
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}

/// A binary's exit: status 0, or its one-line report (`prog: what failed: why`) on stderr and status 1.
/// `fn main() -> ExitCode { report::exit("mkpayload", run()) }`; `anyhow::Error` fits `E`.
pub fn exit<E: AsRef<dyn Error>>(prog: &str, result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prog}: {}", one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {path}: {source}")]
    struct Names {
        path: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("reading the config")]
    struct Wraps(#[source] Names);

    fn not_found() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory")
    }

    #[test]
    fn a_cause_the_message_already_names_is_not_repeated() {
        let e = Names { path: "/x".into(), source: not_found() };
        assert_eq!(one_line(&e), "cannot open /x: No such file or directory");
    }

    #[test]
    fn causes_the_message_does_not_name_are_appended_in_order() {
        let e = Wraps(Names { path: "/x".into(), source: not_found() });
        assert_eq!(one_line(&e), "reading the config: cannot open /x: No such file or directory");
    }
}
