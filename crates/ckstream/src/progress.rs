//! Progress bars on a terminal; silence everywhere else.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-count bar fed by polling a counter, drawn only when stderr is a terminal.
pub struct Bar {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Bar {
    /// Starts a bar for `total` bytes labelled `label`; `read` returns bytes done so far,
    /// and the total when it is known only later (0: keep the one given).
    pub fn bytes(
        label: &str,
        total: u64,
        quiet: bool,
        read: impl Fn() -> (u64, u64) + Send + 'static,
    ) -> Self {
        let visible = !quiet && std::io::stderr().is_terminal();
        let bar = if visible {
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(8))
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = visible.then(|| {
            let bar = bar.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (done, total) = read();
                    if total > 0 {
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        Bar { bar, stop, ticker }
    }

    /// Removes the bar.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.bar.finish_and_clear();
    }
}
