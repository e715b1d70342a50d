//! Layers that wrap any [`ChatModel`]: retry with backoff, per-call timeout, concurrency
//! limit. They compose: `Retry(Timeout(Limit(provider)))` retries calls that time out.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::Semaphore;

use super::{AttemptNotice, ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind};

/// Retry policy: exponential backoff with full jitter, honouring Retry-After.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_retries: 3, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// How long to wait before retry number `retry` (1-based) after `err`.
    pub fn delay(&self, retry: u32, err: &ModelError) -> Duration {
        if let Some(ra) = err.retry_after {
            // The provider knows best; cap it so a bogus header cannot park a peer for hours.
            return ra.min(Duration::from_secs(300));
        }
        let exp = self.base_delay.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let cap = exp.min(self.max_delay);
        // Full jitter: uniform in [cap/2, cap], so concurrent peers spread out.
        let lo = cap / 2;
        let span = cap.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(if span == 0 { 0 } else { rand::rng().random_range(0..=span) })
    }
}

/// Observes retries (for metrics and the transcript).
pub type RetryObserver = Arc<dyn Fn(&ChatRequest, &ModelError, Duration) + Send + Sync>;

/// Retries retryable failures (429, 5xx, timeouts, cut streams, empty answers).
pub struct Retry<M> {
    inner: M,
    policy: RetryPolicy,
    observer: Option<RetryObserver>,
}

impl<M> Retry<M> {
    pub fn new(inner: M, policy: RetryPolicy) -> Self {
        Retry { inner, policy, observer: None }
    }
    pub fn with_observer(mut self, o: RetryObserver) -> Self {
        self.observer = Some(o);
        self
    }
}

#[async_trait]
impl<M: ChatModel> ChatModel for Retry<M> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let mut attempt = 1;
        loop {
            match self.inner.chat(req).await {
                Ok(r) => return Ok(r),
                Err(mut e) => {
                    if !e.kind.is_retryable() || attempt > self.policy.max_retries {
                        e.attempts = attempt;
                        return Err(e);
                    }
                    let wait = self.policy.delay(attempt, &e);
                    tracing::warn!(peer = %req.peer, step = %req.step, attempt, error = %e, wait_ms = wait.as_millis() as u64, "model call failed; retrying");
                    if let Some(o) = &self.observer {
                        o(req, &e, wait);
                    }
                    let of = self.policy.max_retries + 1;
                    if let Some(tell) = &req.on_attempt {
                        tell(AttemptNotice::Failed {
                            attempt,
                            of,
                            error: e.to_string(),
                            wait,
                            retry_after: e.retry_after.is_some(),
                        });
                    }
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                    if let Some(tell) = &req.on_attempt {
                        tell(AttemptNotice::Started { attempt, of });
                    }
                }
            }
        }
    }
}

/// Fails a call that takes longer than `limit` with [`ModelErrorKind::Timeout`].
pub struct Timeout<M> {
    inner: M,
    limit: Duration,
}

impl<M> Timeout<M> {
    pub fn new(inner: M, limit: Duration) -> Self {
        Timeout { inner, limit }
    }
}

#[async_trait]
impl<M: ChatModel> ChatModel for Timeout<M> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        match tokio::time::timeout(self.limit, self.inner.chat(req)).await {
            Ok(r) => r,
            Err(_) => Err(ModelError::new(
                ModelErrorKind::Timeout,
                format!("no complete answer within {} ms", self.limit.as_millis()),
            )),
        }
    }
}

/// At most `n` calls in flight at once through this layer.
pub struct ConcurrencyLimit<M> {
    inner: M,
    permits: Arc<Semaphore>,
}

impl<M> ConcurrencyLimit<M> {
    pub fn new(inner: M, n: usize) -> Self {
        ConcurrencyLimit { inner, permits: Arc::new(Semaphore::new(n.max(1))) }
    }
}

#[async_trait]
impl<M: ChatModel> ChatModel for ConcurrencyLimit<M> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let _permit = self.permits.acquire().await.expect("semaphore never closed");
        self.inner.chat(req).await
    }
}

/// Settings for the standard stack of layers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerConfig {
    pub retry: RetryPolicy,
    pub timeout: Duration,
    pub max_concurrency: usize,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig { retry: RetryPolicy::default(), timeout: Duration::from_secs(120), max_concurrency: 8 }
    }
}

/// Wrap a provider in the standard stack: retry ∘ timeout ∘ concurrency limit.
pub fn standard_stack(
    model: Arc<dyn ChatModel>,
    cfg: LayerConfig,
    observer: Option<RetryObserver>,
) -> Arc<dyn ChatModel> {
    let limited = ConcurrencyLimit::new(model, cfg.max_concurrency);
    let timed = Timeout::new(limited, cfg.timeout);
    let mut retry = Retry::new(timed, cfg.retry);
    if let Some(o) = observer {
        retry = retry.with_observer(o);
    }
    Arc::new(retry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Flaky {
        fails: Vec<ModelError>,
        calls: AtomicU32,
    }

    #[async_trait]
    impl ChatModel for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        async fn chat(&self, _req: &ChatRequest) -> Result<ChatResponse, ModelError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) as usize;
            match self.fails.get(n) {
                Some(e) => Err(e.clone()),
                None => Ok(ChatResponse { text: "ok".into(), ..Default::default() }),
            }
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy { max_retries: 3, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(5) }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_errors_and_honours_retry_after() {
        let m = Retry::new(
            Flaky {
                fails: vec![
                    ModelError::new(ModelErrorKind::RateLimited, "slow down")
                        .with_retry_after(Some(Duration::from_secs(2))),
                    ModelError::new(ModelErrorKind::Server, "boom").with_status(500),
                ],
                calls: AtomicU32::new(0),
            },
            quick(),
        );
        let start = tokio::time::Instant::now();
        let r = m.chat(&ChatRequest::simple("p", "hi")).await.unwrap();
        assert_eq!(r.text, "ok");
        assert_eq!(m.inner.calls.load(Ordering::SeqCst), 3);
        // 2 s from Retry-After, then the second retry's 100–200 ms of backoff (virtual time).
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(2100) && waited <= Duration::from_millis(2200), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn tells_the_caller_of_each_failed_attempt_and_each_retry() {
        let m = Retry::new(
            Flaky {
                fails: vec![
                    ModelError::new(ModelErrorKind::Timeout, "no complete answer within 30000 ms"),
                    ModelError::new(ModelErrorKind::RateLimited, "slow down")
                        .with_status(429)
                        .with_retry_after(Some(Duration::from_secs(7))),
                ],
                calls: AtomicU32::new(0),
            },
            quick(),
        );
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut req = ChatRequest::simple("p", "hi");
        let s = seen.clone();
        req.on_attempt = Some(Arc::new(move |n| s.lock().unwrap().push(n)));
        m.chat(&req).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        match &seen[0] {
            AttemptNotice::Failed { attempt: 1, of: 4, error, retry_after: false, .. } => {
                assert!(error.contains("30000 ms"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(seen[1], AttemptNotice::Started { attempt: 2, of: 4 });
        match &seen[2] {
            AttemptNotice::Failed { attempt: 2, of: 4, wait, retry_after: true, .. } => {
                assert_eq!(*wait, Duration::from_secs(7))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(seen[3], AttemptNotice::Started { attempt: 3, of: 4 });
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_auth_and_gives_up_after_max() {
        let m = Retry::new(
            Flaky {
                fails: vec![ModelError::new(ModelErrorKind::Auth, "no").with_status(401)],
                calls: AtomicU32::new(0),
            },
            quick(),
        );
        let e = m.chat(&ChatRequest::simple("p", "hi")).await.unwrap_err();
        assert_eq!((e.kind, e.attempts), (ModelErrorKind::Auth, 1));

        let m = Retry::new(
            Flaky { fails: vec![ModelError::new(ModelErrorKind::Server, "x"); 10], calls: AtomicU32::new(0) },
            quick(),
        );
        let e = m.chat(&ChatRequest::simple("p", "hi")).await.unwrap_err();
        assert_eq!((e.kind, e.attempts), (ModelErrorKind::Server, 4));
        assert_eq!(m.inner.calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p =
            RetryPolicy { max_retries: 10, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
        let e = ModelError::new(ModelErrorKind::Server, "x");
        for _ in 0..50 {
            let d1 = p.delay(1, &e);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay(3, &e);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d9 = p.delay(9, &e);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_secs(1));
        }
    }

    struct Slow;
    #[async_trait]
    impl ChatModel for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        async fn chat(&self, _req: &ChatRequest) -> Result<ChatResponse, ModelError> {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(ChatResponse::default())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_fails_slow_calls() {
        let m = Timeout::new(Slow, Duration::from_secs(1));
        let e = m.chat(&ChatRequest::simple("p", "hi")).await.unwrap_err();
        assert_eq!(e.kind, ModelErrorKind::Timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limit_serializes() {
        let m = Arc::new(ConcurrencyLimit::new(Slow, 2));
        let start = tokio::time::Instant::now();
        let mut hs = Vec::new();
        for _ in 0..4 {
            let m = m.clone();
            hs.push(tokio::spawn(async move { m.chat(&ChatRequest::simple("p", "x")).await }));
        }
        for h in hs {
            h.await.unwrap().unwrap();
        }
        // 4 calls of 10 s, 2 at a time: 20 s, not 10 s.
        assert_eq!(start.elapsed().as_secs(), 20);
    }
}
