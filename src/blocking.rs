//! The one way async code runs blocking work — a file-system walk, a read
//! or fsync of local state, a lock wait, SQLite, a child process — on
//! tokio's blocking pool, so the runtime's threads keep serving uploads,
//! timers and signals.

/// Runs `f` on the blocking pool. `what` names the work in the error when
/// `f` panicked (the panic is reported, not propagated).
pub async fn run<T, F>(what: &str, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("{what}: the blocking task failed: {e}"))
}

/// Starts `f` on the blocking pool at once, for work that runs alongside
/// the caller (a producer feeding a channel the caller drains); await the
/// handle for its result.
pub fn spawn<T, F>(f: F) -> tokio::task::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f)
}
