//! Prometheus metrics, kept by hand: a few counters, gauges and two latency histograms, rendered
//! as the text exposition format on GET /metrics.

use std::collections::BTreeMap;
use std::sync::Mutex;

const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default, Clone)]
struct Histogram {
    /// Cumulative: counts[i] = observations <= BUCKETS[i].
    counts: [u64; BUCKETS.len()],
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (i, b) in BUCKETS.iter().enumerate() {
            let c = self.counts[i];
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {c}\n"));
        }
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n",
            self.n, self.sum, self.n
        ));
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<u16, u64>,
    prompt_tokens: u64,
    generated_tokens: u64,
    queue: usize,
    running: usize,
    batch: usize,
    kv_bytes: usize,
    ttft: Histogram,
    itl: Histogram,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut g) = self.inner.lock() {
            f(&mut g)
        }
    }
    pub fn request(&self, status: u16) {
        self.with(|m| *m.requests.entry(status).or_default() += 1)
    }
    pub fn tokens(&self, prompt: usize, generated: usize) {
        self.with(|m| {
            m.prompt_tokens += prompt as u64;
            m.generated_tokens += generated as u64;
        })
    }
    /// Scheduler state after a step.
    pub fn state(&self, queue: usize, running: usize, batch: usize, kv_bytes: usize) {
        self.with(|m| {
            m.queue = queue;
            m.running = running;
            m.batch = batch;
            m.kv_bytes = kv_bytes;
        })
    }
    pub fn ttft(&self, secs: f64) {
        self.with(|m| m.ttft.observe(secs))
    }
    pub fn itl(&self, secs: f64) {
        self.with(|m| m.itl.observe(secs))
    }

    pub fn render(&self) -> String {
        let Ok(m) = self.inner.lock() else { return String::new() };
        let mut out = String::new();
        out.push_str(
            "# HELP recompose_requests_total HTTP requests by status code.\n# TYPE recompose_requests_total counter\n",
        );
        for (s, n) in &m.requests {
            out.push_str(&format!("recompose_requests_total{{status=\"{s}\"}} {n}\n"));
        }
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        };
        scalar(
            &mut out,
            "recompose_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            m.prompt_tokens.to_string(),
        );
        scalar(
            &mut out,
            "recompose_generated_tokens_total",
            "counter",
            "Tokens generated.",
            m.generated_tokens.to_string(),
        );
        scalar(&mut out, "recompose_queue_length", "gauge", "Requests waiting to start.", m.queue.to_string());
        scalar(
            &mut out,
            "recompose_running_requests",
            "gauge",
            "Requests being prefilled or decoded.",
            m.running.to_string(),
        );
        scalar(&mut out, "recompose_batch_size", "gauge", "Rows in the last decode step.", m.batch.to_string());
        scalar(
            &mut out,
            "recompose_kv_bytes",
            "gauge",
            "Bytes of KV cache held by running requests.",
            m.kv_bytes.to_string(),
        );
        m.ttft.render("recompose_time_to_first_token_seconds", "Time from arrival to the first token.", &mut out);
        m.itl.render("recompose_inter_token_latency_seconds", "Time between successive tokens of a request.", &mut out);
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
        m.state(2, 3, 3, 1024);
        let t = m.render();
        assert!(t.contains("recompose_requests_total{status=\"200\"} 2"));
        assert!(t.contains("recompose_requests_total{status=\"429\"} 1"));
        assert!(t.contains("recompose_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
        assert!(t.contains("recompose_time_to_first_token_seconds_bucket{le=\"5\"} 2"));
        assert!(t.contains("recompose_time_to_first_token_seconds_count 2"));
        assert!(t.contains("recompose_kv_bytes 1024"));
    }
}
