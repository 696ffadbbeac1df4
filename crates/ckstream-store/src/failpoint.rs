//! Named points in the commit and publish path where tests inject faults.
//!
//! `CKSTREAM_FAILPOINT=NAME:ACTION` (several separated by commas) makes the process,
//! on reaching point NAME:
//! - `error`: fail there with an I/O error, as if the step itself had failed;
//! - `kill`: die at once by SIGKILL (a crash: no cleanup runs);
//! - `stop`: stop itself with SIGSTOP, so a test can take a crash-consistent copy of the
//!   disk at exactly that point and then let it go on (SIGCONT) or kill it.
//!
//! Without the variable every point is a no-op costing one environment lookup; points
//! sit only on the publish path, never per chunk.

use std::io;

/// Acts on `name` if `CKSTREAM_FAILPOINT` names it (see the module documentation).
///
/// # Errors
/// An I/O error saying which failpoint fired, for the `error` action.
pub fn hit(name: &str) -> io::Result<()> {
    let Some(spec) = std::env::var_os("CKSTREAM_FAILPOINT") else {
        return Ok(());
    };
    let spec = spec.to_string_lossy();
    for point in spec.split(',') {
        let (point_name, action) = point.split_once(':').unwrap_or((point, "error"));
        if point_name != name {
            continue;
        }
        let me = rustix::process::getpid();
        match action {
            "kill" => {
                let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
            }
            "stop" => {
                let _ = rustix::process::kill_process(me, rustix::process::Signal::STOP);
            }
            _ => {
                return Err(io::Error::other(format!("failpoint {name} fired")));
            }
        }
    }
    Ok(())
}
