//! The trust issue's delivery and store regressions: endpoint errors hold, bad events are
//! bisected out, timeouts shrink the batch, unreadable or corrupt data never stops the daemon.
