//! `drover-cni`: the chained CNI plugin that hands each new pod to the drover daemon (see
//! `drover::cni::plugin`).

use std::io::{Read, Write};

fn main() -> std::process::ExitCode {
    let mut stdin = Vec::new();
    // VERSION may come without a configuration; an unreadable stdin is an empty one.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = drover::cni::plugin::run(&|k| std::env::var(k).ok(), &stdin);
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::ExitCode::from(u8::try_from(out.status).unwrap_or(1))
}
