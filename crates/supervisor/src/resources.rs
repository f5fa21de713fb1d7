//! A registry of resources that depend on each other and are released in
//! reverse topological order.
//!
//! Invariants:
//! - Resource names are unique within a registry.
//! - A resource may only depend on resources registered before it, so every
//!   dependency has a strictly smaller [`ResourceId`] than its dependent and the
//!   dependency graph can never contain a cycle.
//! - Because of the previous point, reverse registration order is a reverse
//!   topological order: [`ResourceRegistry::cleanup_all`] walks the resources
//!   from the newest to the oldest, which releases every dependent before
//!   anything it depends on and is fully deterministic.
//! - Every cleanup runs exactly once, in its own task and under its own
//!   timeout; a failure, a timeout or a panic in one cleanup is recorded in the
//!   [`CleanupReport`] and never prevents the remaining cleanups from running.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Serialize, Serializer};
use tokio::time::Instant;

/// The future a cleanup returns; an `Err` carries a human-readable reason.
pub type CleanupFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A boxed cleanup action, called at most once when the registry is drained.
pub type CleanupFn = Box<dyn FnOnce() -> CleanupFuture + Send + 'static>;

/// Identifies a registered resource; ids grow in registration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId(usize);

/// Errors returned by [`ResourceRegistry::register`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The named dependency has not been registered (yet).
    #[error("resource {resource:?} depends on unknown resource {dependency:?}")]
    UnknownDependency {
        resource: String,
        dependency: String,
    },
    /// A resource with this name is already registered.
    #[error("resource {0:?} is already registered")]
    Duplicate(String),
}

/// The outcome of one cleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupResult {
    Ok,
    /// The cleanup returned an error or panicked; the string says which.
    Failed(String),
    /// The cleanup did not finish within this timeout and was aborted.
    TimedOut(#[serde(serialize_with = "serialize_ms")] Duration),
}

/// One line of a [`CleanupReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CleanupEntry {
    pub name: String,
    /// Wall time the cleanup took, serialized as `duration_ms`.
    #[serde(rename = "duration_ms", serialize_with = "serialize_ms")]
    pub duration: Duration,
    pub result: CleanupResult,
}

/// What [`ResourceRegistry::cleanup_all`] did, in the order it did it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    pub entries: Vec<CleanupEntry>,
}

impl CleanupReport {
    /// True when every cleanup finished successfully.
    pub fn is_clean(&self) -> bool {
        self.entries.iter().all(|e| e.result == CleanupResult::Ok)
    }
}

/// Durations are reported as fractional milliseconds so that reports stay
/// readable in JSON without losing sub-millisecond precision.
fn serialize_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

struct Resource {
    name: String,
    depends_on: Vec<ResourceId>,
    timeout: Duration,
    cleanup: CleanupFn,
}

/// Resources with dependencies, released dependents-first by
/// [`ResourceRegistry::cleanup_all`].
#[derive(Default)]
pub struct ResourceRegistry {
    resources: Vec<Resource>,
}

impl std::fmt::Debug for ResourceRegistry {
    // Cleanup closures are opaque, so only the names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.resources.iter().map(|r| &r.name))
            .finish()
    }
}

impl ResourceRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of registered resources.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Registers a resource whose `cleanup` must run before the cleanups of
    /// everything in `depends_on`, each of which must already be registered.
    pub fn register<F>(
        &mut self,
        name: impl Into<String>,
        depends_on: &[&str],
        timeout: Duration,
        cleanup: F,
    ) -> Result<ResourceId, RegistryError>
    where
        F: FnOnce() -> CleanupFuture + Send + 'static,
    {
        let name = name.into();
        if self.find(&name).is_some() {
            return Err(RegistryError::Duplicate(name));
        }
        let mut deps = Vec::with_capacity(depends_on.len());
        for dep in depends_on {
            match self.find(dep) {
                Some(id) => deps.push(id),
                None => {
                    return Err(RegistryError::UnknownDependency {
                        resource: name,
                        dependency: (*dep).to_owned(),
                    })
                }
            }
        }
        let id = ResourceId(self.resources.len());
        self.resources.push(Resource {
            name,
            depends_on: deps,
            timeout,
            cleanup: Box::new(cleanup),
        });
        Ok(id)
    }

    fn find(&self, name: &str) -> Option<ResourceId> {
        self.resources
            .iter()
            .position(|r| r.name == name)
            .map(ResourceId)
    }

    /// Runs every cleanup, dependents first, and reports each outcome.
    ///
    /// Must be called inside a Tokio runtime because each cleanup runs in its
    /// own spawned task; that is what lets a panic be caught and reported.
    pub async fn cleanup_all(self) -> CleanupReport {
        let mut entries = Vec::with_capacity(self.resources.len());
        for (index, resource) in self.resources.into_iter().enumerate().rev() {
            // Registration only accepts known names, so this always holds; the
            // check documents the ordering argument in the module doc.
            debug_assert!(resource.depends_on.iter().all(|d| d.0 < index));
            let name = resource.name;
            let start = Instant::now();
            let result = run_one(resource.cleanup, resource.timeout).await;
            let duration = start.elapsed();
            match &result {
                CleanupResult::Ok => tracing::debug!(%name, ?duration, "cleanup finished"),
                CleanupResult::Failed(reason) => {
                    tracing::warn!(%name, ?duration, %reason, "cleanup failed")
                }
                CleanupResult::TimedOut(t) => {
                    tracing::warn!(%name, timeout = ?t, "cleanup timed out")
                }
            }
            entries.push(CleanupEntry {
                name,
                duration,
                result,
            });
        }
        CleanupReport { entries }
    }
}

/// Runs one cleanup in its own task so that a panic, whether raised while
/// building the future or while polling it, surfaces as a `JoinError`.
async fn run_one(cleanup: CleanupFn, timeout: Duration) -> CleanupResult {
    let mut handle = tokio::spawn(async move { cleanup().await });
    match tokio::time::timeout(timeout, &mut handle).await {
        Ok(Ok(Ok(()))) => CleanupResult::Ok,
        Ok(Ok(Err(reason))) => CleanupResult::Failed(reason),
        Ok(Err(join_error)) => CleanupResult::Failed(describe_join_error(join_error)),
        Err(_elapsed) => {
            // A hung cleanup must not keep running behind the report's back.
            handle.abort();
            CleanupResult::TimedOut(timeout)
        }
    }
}

fn describe_join_error(err: tokio::task::JoinError) -> String {
    if !err.is_panic() {
        return "cleanup task was cancelled".to_owned();
    }
    let payload = err.into_panic();
    let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    };
    format!("cleanup panicked: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<String>>>;

    const T: Duration = Duration::from_secs(5);

    /// A cleanup that appends its name to the log and then returns `outcome`.
    fn recording(log: &Log, name: &str, outcome: Result<(), String>) -> CleanupFn {
        let log = Arc::clone(log);
        let name = name.to_owned();
        Box::new(move || {
            Box::pin(async move {
                log.lock().unwrap().push(name);
                outcome
            })
        })
    }

    fn logged(log: &Log) -> Vec<String> {
        log.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn diamond_is_cleaned_dependents_first() {
        // db <- (cache, queue) <- api: api goes first, db goes last.
        let log = Log::default();
        let mut reg = ResourceRegistry::new();
        reg.register("db", &[], T, recording(&log, "db", Ok(())))
            .unwrap();
        reg.register("cache", &["db"], T, recording(&log, "cache", Ok(())))
            .unwrap();
        reg.register("queue", &["db"], T, recording(&log, "queue", Ok(())))
            .unwrap();
        reg.register(
            "api",
            &["cache", "queue"],
            T,
            recording(&log, "api", Ok(())),
        )
        .unwrap();
        let report = reg.cleanup_all().await;
        assert_eq!(logged(&log), ["api", "queue", "cache", "db"]);
        let names: Vec<_> = report.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["api", "queue", "cache", "db"]);
        assert!(report.is_clean());
    }

    #[tokio::test]
    async fn failing_cleanup_does_not_stop_others() {
        let log = Log::default();
        let mut reg = ResourceRegistry::new();
        reg.register("a", &[], T, recording(&log, "a", Ok(())))
            .unwrap();
        reg.register("b", &["a"], T, recording(&log, "b", Err("boom".into())))
            .unwrap();
        reg.register("c", &["b"], T, recording(&log, "c", Ok(())))
            .unwrap();
        let report = reg.cleanup_all().await;
        assert_eq!(logged(&log), ["c", "b", "a"]);
        assert!(!report.is_clean());
        assert_eq!(report.entries[1].name, "b");
        assert_eq!(
            report.entries[1].result,
            CleanupResult::Failed("boom".into())
        );
        assert_eq!(report.entries[0].result, CleanupResult::Ok);
        assert_eq!(report.entries[2].result, CleanupResult::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn hanging_cleanup_times_out_and_others_run() {
        let log = Log::default();
        let mut reg = ResourceRegistry::new();
        reg.register("base", &[], T, recording(&log, "base", Ok(())))
            .unwrap();
        let hang_timeout = Duration::from_millis(1500);
        reg.register("hang", &["base"], hang_timeout, || {
            Box::pin(std::future::pending())
        })
        .unwrap();
        reg.register("top", &["hang"], T, recording(&log, "top", Ok(())))
            .unwrap();
        let report = reg.cleanup_all().await;
        assert_eq!(logged(&log), ["top", "base"]);
        let hang = &report.entries[1];
        assert_eq!(hang.name, "hang");
        assert_eq!(hang.result, CleanupResult::TimedOut(hang_timeout));
        assert_eq!(hang.duration, hang_timeout);
        assert_eq!(report.entries[2].result, CleanupResult::Ok);
    }

    #[tokio::test]
    async fn panicking_cleanup_is_reported_failed() {
        let log = Log::default();
        let mut reg = ResourceRegistry::new();
        reg.register("a", &[], T, recording(&log, "a", Ok(())))
            .unwrap();
        reg.register("p", &["a"], T, || {
            Box::pin(async { panic!("socket vanished") })
        })
        .unwrap();
        reg.register("q", &[], T, || -> CleanupFuture {
            panic!("no future for {}", "q")
        })
        .unwrap();
        let report = reg.cleanup_all().await;
        assert_eq!(logged(&log), ["a"]);
        assert_eq!(
            report.entries[0].result,
            CleanupResult::Failed("cleanup panicked: no future for q".into())
        );
        assert_eq!(
            report.entries[1].result,
            CleanupResult::Failed("cleanup panicked: socket vanished".into())
        );
        assert_eq!(report.entries[2].result, CleanupResult::Ok);
    }

    #[test]
    fn unknown_dependency_is_an_error() {
        let log = Log::default();
        let mut reg = ResourceRegistry::new();
        let err = reg
            .register("api", &["db"], T, recording(&log, "api", Ok(())))
            .unwrap_err();
        assert_eq!(
            err,
            RegistryError::UnknownDependency {
                resource: "api".into(),
                dependency: "db".into()
            }
        );
        assert_eq!(
            err.to_string(),
            r#"resource "api" depends on unknown resource "db""#
        );
        assert!(reg.is_empty());
    }

    #[test]
    fn duplicate_name_is_an_error() {
        let log = Log::default();
        let mut reg = ResourceRegistry::new();
        let id = reg
            .register("db", &[], T, recording(&log, "db", Ok(())))
            .unwrap();
        assert_eq!(id, ResourceId(0));
        let err = reg
            .register("db", &[], T, recording(&log, "db", Ok(())))
            .unwrap_err();
        assert_eq!(err, RegistryError::Duplicate("db".into()));
        assert_eq!(err.to_string(), r#"resource "db" is already registered"#);
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn self_dependency_is_unknown() {
        let log = Log::default();
        let mut reg = ResourceRegistry::new();
        let err = reg
            .register("a", &["a"], T, recording(&log, "a", Ok(())))
            .unwrap_err();
        assert!(matches!(err, RegistryError::UnknownDependency { .. }));
    }
}
