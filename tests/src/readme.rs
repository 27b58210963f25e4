//! The README's command blocks, read by the tests that run them as written.
//!
//! Owns: finding a ```sh block after a heading or sentence of README.md and the exit code a line's comment
//! promises. Does not: run anything (the VM tour in qemu.rs and the host tour in host_tour.rs do).

use std::path::Path;

/// README.md of the workspace.
pub fn read(workspace: &Path) -> String {
    std::fs::read_to_string(workspace.join("README.md")).unwrap_or_default()
}

/// The non-empty lines of the first ```sh block after the first occurrence of `marker` (a heading or a
/// sentence), trimmed; empty when there is no such block.
pub fn sh_block(readme: &str, marker: &str) -> Vec<String> {
    readme
        .split_once(marker)
        .and_then(|(_, s)| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .map(|b| b.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default()
}

/// The exit code a line's comment promises ("# exits 1: …"), else 0.
pub fn expected_code(line: &str) -> i32 {
    line.split_once("# exits ").and_then(|(_, c)| c.split(|ch: char| !ch.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_after_a_marker_and_promised_exit_codes() {
        let md = "# x\n```sh\nfirst\n```\n## Tour\ntext\n```sh\na # exits 1: \"no\"\n\n  b\n```\n```sh\nc\n```\n";
        assert_eq!(sh_block(md, "## Tour"), ["a # exits 1: \"no\"", "b"]);
        assert!(sh_block(md, "## Missing").is_empty());
        assert_eq!(expected_code("a # exits 1: \"no\""), 1);
        assert_eq!(expected_code("b # plain"), 0);
    }
}
