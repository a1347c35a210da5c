//! Prometheus metrics through the prometheus-client crate: request counts by status, token
//! counters, scheduler gauges and latency histograms, rendered in the OpenMetrics text format on
//! GET /metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const STEP_TOKEN_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: u16,
}

/// A metric the engine does not own, read when /metrics is rendered (the expert store's
/// counters, from the model's side): a collector of the registry, encoded as its own metrics.
pub struct External {
    /// Without the `_total` suffix for counters (the encoder adds it).
    pub name: &'static str,
    pub help: &'static str,
    pub counter: bool,
    pub read: Box<dyn Fn() -> Reading + Send + Sync>,
}

/// An external metric's value: counts print as integers, the rest as floats.
pub enum Reading {
    Count(u64),
    Value(f64),
}

/// The external metrics, read at each scrape.
struct Externals(Vec<External>);

impl std::fmt::Debug for Externals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|m| m.name)).finish()
    }
}

impl prometheus_client::collector::Collector for Externals {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::{counter::ConstCounter, gauge::ConstGauge};
        fn put(
            enc: &mut prometheus_client::encoding::DescriptorEncoder,
            m: &External,
            metric: impl EncodeMetric,
        ) -> Result<(), std::fmt::Error> {
            metric.encode(enc.encode_descriptor(m.name, m.help, None, metric.metric_type())?)
        }
        for m in &self.0 {
            match ((m.read)(), m.counter) {
                (Reading::Count(v), true) => put(&mut enc, m, ConstCounter::new(v))?,
                (Reading::Value(v), true) => put(&mut enc, m, ConstCounter::new(v))?,
                (Reading::Count(v), false) => put(&mut enc, m, ConstGauge::new(v))?,
                (Reading::Value(v), false) => put(&mut enc, m, ConstGauge::new(v))?,
            }
        }
        Ok(())
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<Status, Counter>,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    cached_prompt_tokens: Counter,
    queue: Gauge,
    running: Gauge,
    batch: Gauge,
    kv_bytes: Gauge,
    prefix_cache_bytes: Gauge,
    ttft: Histogram,
    itl: Histogram,
    step_tokens: Histogram,
    step_experts: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Status, Counter>::default();
        let (prompt_tokens, generated_tokens, cached_prompt_tokens) =
            (Counter::default(), Counter::default(), Counter::default());
        let (queue, running, batch, kv_bytes, prefix_cache_bytes) =
            (Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default());
        let latency = || Histogram::new(LATENCY_BUCKETS.iter().copied());
        let (ttft, itl) = (latency(), latency());
        let step_tokens = Histogram::new(STEP_TOKEN_BUCKETS.iter().copied());
        let step_experts = Histogram::new((1..=16).map(f64::from));
        // Counters get their `_total` suffix from the registry.
        registry.register("recompose_requests", "HTTP requests by status code", requests.clone());
        registry.register("recompose_prompt_tokens", "Prompt tokens of finished requests", prompt_tokens.clone());
        registry.register("recompose_generated_tokens", "Tokens generated", generated_tokens.clone());
        registry.register(
            "recompose_cached_prompt_tokens",
            "Prompt tokens taken from the prefix cache instead of prefilled",
            cached_prompt_tokens.clone(),
        );
        registry.register("recompose_queue_length", "Requests waiting to start", queue.clone());
        registry.register("recompose_running_requests", "Requests being prefilled or decoded", running.clone());
        registry.register("recompose_batch_size", "Requests past their prompt in the last step", batch.clone());
        registry.register("recompose_kv_bytes", "Bytes of KV cache held by running requests", kv_bytes.clone());
        registry.register(
            "recompose_prefix_cache_bytes",
            "Bytes of KV held by the prefix cache",
            prefix_cache_bytes.clone(),
        );
        registry.register(
            "recompose_time_to_first_token_seconds",
            "Time from arrival to the first token",
            ttft.clone(),
        );
        registry.register(
            "recompose_inter_token_latency_seconds",
            "Time between successive tokens of a request",
            itl.clone(),
        );
        registry.register(
            "recompose_step_tokens",
            "Tokens in each batched step (decode plus prefill)",
            step_tokens.clone(),
        );
        registry.register(
            "recompose_step_experts",
            "Distinct experts of each step's tokens (a MoE routed ahead of the backbone)",
            step_experts.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            cached_prompt_tokens,
            queue,
            running,
            batch,
            kv_bytes,
            prefix_cache_bytes,
            ttft,
            itl,
            step_tokens,
            step_experts,
        }
    }
}

fn gauge(g: &Gauge, v: usize) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

impl Metrics {
    pub fn request(&self, status: u16) {
        self.requests.get_or_create(&Status { status }).inc();
    }

    /// A finished request's prompt tokens, those of them the prefix cache supplied, and its
    /// generated tokens.
    pub fn tokens(&self, prompt: usize, cached: usize, generated: usize) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.cached_prompt_tokens.inc_by(cached as u64);
        self.generated_tokens.inc_by(generated as u64);
    }

    /// Scheduler state after a step.
    pub fn state(&self, queue: usize, running: usize, batch: usize, kv_bytes: usize, prefix_bytes: usize) {
        gauge(&self.queue, queue);
        gauge(&self.running, running);
        gauge(&self.batch, batch);
        gauge(&self.kv_bytes, kv_bytes);
        gauge(&self.prefix_cache_bytes, prefix_bytes);
    }

    pub fn ttft(&self, secs: f64) {
        self.ttft.observe(secs)
    }

    pub fn itl(&self, secs: f64) {
        self.itl.observe(secs)
    }

    /// A step's tokens, and its distinct experts when the batcher knows them (0: not routed
    /// ahead, not observed).
    pub fn step(&self, tokens: usize, experts: usize) {
        self.step_tokens.observe(tokens as f64);
        if experts > 0 {
            self.step_experts.observe(experts as f64);
        }
    }

    /// With `external` rendered after the engine's own metrics.
    pub fn with_external(mut self, external: Vec<External>) -> Self {
        if !external.is_empty() {
            self.registry.register_collector(Box::new(Externals(external)));
        }
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request(200);
        m.request(200);
        m.request(429);
        m.ttft(0.02);
        m.ttft(3.0);
        m.state(2, 3, 3, 1024, 0);
        m.tokens(10, 4, 7);
        let t = m.render();
        assert!(t.contains("recompose_requests_total{status=\"200\"} 2"), "{t}");
        assert!(t.contains("recompose_requests_total{status=\"429\"} 1"));
        assert!(t.contains("recompose_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
        assert!(t.contains("recompose_time_to_first_token_seconds_bucket{le=\"5.0\"} 2"));
        assert!(t.contains("recompose_time_to_first_token_seconds_count 2"));
        assert!(t.contains("recompose_kv_bytes 1024"));
        assert!(t.contains("recompose_cached_prompt_tokens_total 4"));
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn external_metrics_render_before_the_end_as_read_then() {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(3));
        let r = n.clone();
        let read = Box::new(move || Reading::Count(r.load(std::sync::atomic::Ordering::SeqCst)));
        let hits = Box::new(|| Reading::Value(0.5));
        let m = Metrics::default().with_external(vec![
            External { name: "recompose_expert_loads", help: "Loads", counter: true, read },
            External { name: "recompose_expert_hit_rate", help: "Hits", counter: false, read: hits },
        ]);
        n.store(7, std::sync::atomic::Ordering::SeqCst);
        let t = m.render();
        assert!(t.contains("# TYPE recompose_expert_loads counter\nrecompose_expert_loads_total 7\n"), "{t}");
        assert!(t.contains("# TYPE recompose_expert_hit_rate gauge\nrecompose_expert_hit_rate 0.5\n"), "{t}");
        assert_eq!(t.matches("# EOF").count(), 1);
        assert!(t.ends_with("# EOF\n"));
    }
}
