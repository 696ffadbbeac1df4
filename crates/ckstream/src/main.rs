//! `ckstream`: fast, verified checkpoint archives for CRIU processes and containers.
//!
//! This binary is a thin layer: argument parsing, progress and output formatting.
//! The work happens in `ckstream-format`, `ckstream-store` and `ckstream-fs`.

mod cmd;
mod interrupt;
mod output;
mod progress;

use std::process::ExitCode;

use clap::Parser;

/// Exit code for an archive that is corrupt, incomplete, unsafe or unsupported (or a
/// podman archive refused for the container settings it asks for).
const EXIT_BAD_ARCHIVE: u8 = 3;
/// Exit code for any other failure.
const EXIT_FAILURE: u8 = 1;

/// Ends the program with this exit code and no message (whoever failed said why).
#[derive(Debug)]
struct ExitWith(u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

fn main() -> ExitCode {
    let cli = cmd::Cli::parse();
    let result = cmd::run(cli);
    #[cfg(feature = "s3")]
    if std::env::var_os("CKSTREAM_S3_STATS").is_some_and(|v| v != "0") {
        // Request and byte counts of object-store access, for tests and benchmarks.
        let stats: serde_json::Map<String, serde_json::Value> = ckstream_store::s3::stats()
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        eprintln!("ckstream-s3-stats: {}", serde_json::Value::Object(stats));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => {
            // The reader of our stdout went away (`ckstream ls | head`): not an error.
            ExitCode::SUCCESS
        }
        Err(err) if err.downcast_ref::<ExitWith>().is_some() => {
            ExitCode::from(err.downcast_ref::<ExitWith>().unwrap().0)
        }
        Err(err) => {
            eprintln!("ckstream: error: {}", output::one_line(&err));
            let bad_archive = err.chain().any(|c| {
                c.downcast_ref::<ckstream_format::Error>()
                    .is_some_and(|e| e.is_bad_archive())
                    || c.downcast_ref::<ckstream_podman::PodmanError>()
                        .is_some_and(|e| e.is_untrusted_archive())
            });
            ExitCode::from(if bad_archive {
                EXIT_BAD_ARCHIVE
            } else {
                EXIT_FAILURE
            })
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            || matches!(c.downcast_ref::<ckstream_format::Error>(), Some(ckstream_format::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
