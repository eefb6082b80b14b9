//! A host for tests: headers, properties, bodies, shared data with CAS, HTTP calls, metrics and
//! logs, all in memory. Several mock VMs can share one shared-data store, like Envoy workers.
//! Also built with the `mock-host` feature, for the fuzz targets.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use hashbrown::{HashMap, HashSet};

use super::host::{
    Body, HeaderMap, HeaderPairs, Host, HostError, HostResult, LogLevel, MetricKind,
};
use streamlb_core::Nanos;

pub type SharedStore = Rc<RefCell<HashMap<String, (Vec<u8>, u32)>>>;
/// (token, cluster, headers) of a dispatched HTTP call.
pub type Call = (u32, String, Vec<(String, String)>);
pub type LocalResponse = (u32, Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
pub struct MockHost {
    pub time: Cell<Nanos>,
    pub properties: RefCell<HashMap<String, Vec<u8>>>,
    pub headers: RefCell<HashMap<(HeaderMap, String), Vec<u8>>>,
    pub bodies: RefCell<HashMap<Body, Vec<u8>>>,
    pub shared: SharedStore,
    pub calls: RefCell<Vec<Call>>,
    pub metric_names: RefCell<HashMap<u32, (MetricKind, String)>>,
    pub metric_values: RefCell<HashMap<u32, i64>>,
    pub logs: RefCell<Vec<(LogLevel, String)>>,
    /// Host calls to fail, by method name (e.g. "property", "shared_set").
    pub failing: RefCell<HashSet<&'static str>>,
    /// Number of body reads (host calls) made.
    pub body_reads: Cell<usize>,
    /// Messages of streams ended with `end_stream_unavailable`.
    pub ended_streams: RefCell<Vec<String>>,
    /// (status, headers, body) of local responses.
    pub local_responses: RefCell<Vec<LocalResponse>>,
    /// The last tick period set (0 stops the timer).
    pub tick_period_ms: Cell<Option<u64>>,
    /// Host calls made (all but `log`), by method name.
    pub host_calls: RefCell<HashMap<&'static str, usize>>,
}

impl MockHost {
    pub fn with_store(shared: SharedStore) -> Self {
        MockHost {
            shared,
            ..MockHost::default()
        }
    }

    pub fn set_property(&self, path: &str, value: &str) {
        self.properties
            .borrow_mut()
            .insert(path.to_string(), value.as_bytes().to_vec());
    }

    pub fn set_request_header(&self, name: &str, value: &str) {
        self.set_header_bytes(HeaderMap::Request, name, value.as_bytes());
    }

    /// Any bytes, as a client or backend could send them.
    pub fn set_header_bytes(&self, map: HeaderMap, name: &str, value: &[u8]) {
        self.headers
            .borrow_mut()
            .insert((map, name.to_string()), value.to_vec());
    }

    pub fn get_bytes(&self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
        self.headers.borrow().get(&(map, name.to_string())).cloned()
    }

    /// A header value that is UTF-8 (None when absent or not UTF-8).
    pub fn get(&self, map: HeaderMap, name: &str) -> Option<String> {
        String::from_utf8(self.get_bytes(map, name)?).ok()
    }

    /// Whether a metric of this exact name was defined (it is exposed, if only at 0).
    pub fn defined(&self, name: &str) -> bool {
        self.metric_names.borrow().values().any(|(_, n)| n == name)
    }

    /// Sum of a metric across definitions with this exact name.
    pub fn metric(&self, name: &str) -> i64 {
        let names = self.metric_names.borrow();
        let values = self.metric_values.borrow();
        names
            .iter()
            .filter(|(_, (_, n))| n == name)
            .map(|(id, _)| values.get(id).copied().unwrap_or(0))
            .sum()
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.logs.borrow().iter().any(|(_, m)| m.contains(needle))
    }

    fn check(&self, method: &'static str) -> HostResult<()> {
        *self.host_calls.borrow_mut().entry(method).or_default() += 1;
        if self.failing.borrow().contains(method) {
            Err(HostError::Status(format!("injected failure in {method}")))
        } else {
            Ok(())
        }
    }
}

impl Host for MockHost {
    fn now(&self) -> HostResult<Nanos> {
        self.check("now")?;
        Ok(self.time.get())
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }

    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>> {
        self.check("property")?;
        Ok(self.properties.borrow().get(&path.join(".")).cloned())
    }

    fn header(&self, map: HeaderMap, name: &str) -> HostResult<Option<Vec<u8>>> {
        self.check("header")?;
        Ok(self.get_bytes(map, name))
    }

    fn headers(&self, map: HeaderMap) -> HostResult<HeaderPairs> {
        self.check("headers")?;
        let h = self.headers.borrow();
        let mut pairs: Vec<(&[u8], &[u8])> = h
            .iter()
            .filter(|((m, _), _)| *m == map)
            .map(|((_, name), value)| (name.as_bytes(), value.as_slice()))
            .collect();
        pairs.sort();
        Ok(HeaderPairs::encode(pairs))
    }

    fn set_header(&self, map: HeaderMap, name: &str, value: Option<&str>) -> HostResult<()> {
        self.check("set_header")?;
        let mut h = self.headers.borrow_mut();
        match value {
            Some(v) => h.insert((map, name.to_string()), v.as_bytes().to_vec()),
            None => h.remove(&(map, name.to_string())),
        };
        Ok(())
    }

    fn body(&self, which: Body, start: usize, len: usize) -> HostResult<Option<Vec<u8>>> {
        self.check("body")?;
        self.body_reads.set(self.body_reads.get() + 1);
        let bodies = self.bodies.borrow();
        Ok(bodies
            .get(&which)
            .and_then(|b| b.get(start..(start + len).min(b.len())))
            .map(<[u8]>::to_vec))
    }

    fn shared_get(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        self.check("shared_get")?;
        Ok(match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()> {
        self.check("shared_set")?;
        let mut store = self.shared.borrow_mut();
        let current = store.get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, current) {
            if want != 0 && want != have {
                return Err(HostError::CasMismatch);
            }
        }
        let next = current.unwrap_or(0) + 1;
        store.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        _timeout_ms: u64,
    ) -> HostResult<u32> {
        self.check("http_call")?;
        let mut calls = self.calls.borrow_mut();
        let token = calls.len() as u32 + 1;
        calls.push((
            token,
            cluster.to_string(),
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        Ok(token)
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> HostResult<u32> {
        self.check("define_metric")?;
        let mut names = self.metric_names.borrow_mut();
        let id = names.len() as u32 + 1;
        names.insert(id, (kind, name.to_string()));
        Ok(id)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> HostResult<()> {
        self.check("increment_metric")?;
        *self.metric_values.borrow_mut().entry(id).or_default() += delta;
        Ok(())
    }

    fn record_metric(&self, id: u32, value: u64) -> HostResult<()> {
        self.check("record_metric")?;
        self.metric_values.borrow_mut().insert(id, value as i64);
        Ok(())
    }

    fn set_tick_period_ms(&self, ms: u64) -> HostResult<()> {
        self.check("set_tick_period")?;
        self.tick_period_ms.set(Some(ms));
        Ok(())
    }

    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
        self.check("send_response")?;
        self.local_responses.borrow_mut().push((
            status,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body.to_vec(),
        ));
        Ok(())
    }

    fn end_stream_unavailable(&self, message: &str) -> HostResult<()> {
        self.check("end_stream")?;
        self.ended_streams.borrow_mut().push(message.to_string());
        Ok(())
    }
}
