//! The proxy-wasm ABI calls the adapter makes, called directly (built only for
//! `wasm32-wasip1`).
//!
//! The SDK's `hostcalls` panic on any status they do not expect and on non-UTF-8 header values:
//! e.g. reading `:status` after a failed HTTP call gets `BadArgument` (the call has no response
//! headers), and a header value with a byte ≥ 0x80 fails `String::from_utf8`. A panic traps the
//! VM of the whole worker. These wrappers return every status as an error and every value as
//! bytes. (HTTP calls still go through the SDK, which must register the token for the
//! response to reach the root context.)

use std::ptr::{null, null_mut};

use crate::filter::host::{HostError, HostResult};
use streamlb_core::Nanos;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

/// proxy-wasm log level `critical`.
pub const LOG_CRITICAL: u32 = 5;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer: u32,
        start: usize,
        max_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

fn error(what: &str, status: u32) -> HostError {
    let name = match status {
        CAS_MISMATCH => return HostError::CasMismatch,
        NOT_FOUND => "NotFound",
        2 => "BadArgument",
        3 => "SerializationFailure",
        4 => "ParseFailure",
        6 => "InvalidMemoryAccess",
        7 => "Empty",
        10 => "InternalFailure",
        12 => "Unimplemented",
        _ => "unknown status",
    };
    HostError::Status(format!("{what}: {name} ({status})"))
}

fn check(what: &str, status: u32) -> HostResult<()> {
    if status == OK {
        Ok(())
    } else {
        Err(error(what, status))
    }
}

/// Takes ownership of bytes the host allocated in this VM (through the SDK's exported
/// `proxy_on_memory_allocate`, which allocates exactly `size` bytes).
///
/// # Safety
/// `data` is null or points at `size` bytes the host allocated for this call.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

pub fn log(level: u32, message: &str) {
    // SAFETY: pointer and length of a live &str.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

pub fn now() -> HostResult<Nanos> {
    let mut t: u64 = 0;
    // SAFETY: `t` outlives the call.
    check("get_current_time", unsafe {
        proxy_get_current_time_nanoseconds(&mut t)
    })?;
    Ok(t)
}

pub fn set_tick_period_ms(ms: u64) -> HostResult<()> {
    let ms = u32::try_from(ms).unwrap_or(u32::MAX);
    // SAFETY: no pointers.
    check("set_tick_period", unsafe {
        proxy_set_tick_period_milliseconds(ms)
    })
}

/// A buffer (body, call response, configuration); `None` when the host has none.
pub fn buffer(buffer: u32, start: usize, max_size: usize) -> HostResult<Option<Vec<u8>>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers outlive the call; the host fills them or leaves them null.
    let status = unsafe { proxy_get_buffer_bytes(buffer, start, max_size, &mut data, &mut size) };
    match status {
        // SAFETY: the host allocated `size` bytes at `data` (or left it null).
        OK => Ok((!data.is_null()).then(|| unsafe { owned(data, size) })),
        NOT_FOUND => Ok(None),
        s => Err(error("get_buffer", s)),
    }
}

/// A header value as bytes, whatever they are; `None` when absent.
pub fn header(map: u32, name: &str) -> HostResult<Option<Vec<u8>>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: `name` is live; out-pointers outlive the call.
    let status =
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    match status {
        // SAFETY: the host allocated `size` bytes at `data` (or left it null: empty value).
        OK => Ok(Some(unsafe { owned(data, size) })),
        NOT_FOUND => Ok(None),
        s => Err(error("get_header", s)),
    }
}

/// The whole header map, serialized (see `HeaderPairs`).
pub fn headers(map: u32) -> HostResult<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers outlive the call.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    match status {
        // SAFETY: the host allocated `size` bytes at `data` (or left it null: no headers).
        OK => Ok(unsafe { owned(data, size) }),
        NOT_FOUND => Ok(Vec::new()),
        s => Err(error("get_header_map_pairs", s)),
    }
}

/// Set (`Some`) or remove (`None`) a header.
pub fn set_header(map: u32, name: &str, value: Option<&[u8]>) -> HostResult<()> {
    // SAFETY: `name` and `value` are live for the call.
    let status = unsafe {
        match value {
            Some(v) => {
                proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len())
            }
            None => proxy_remove_header_map_value(map, name.as_ptr(), name.len()),
        }
    };
    check("set_header", status)
}

pub fn property(path: &[&str]) -> HostResult<Option<Vec<u8>>> {
    let serialized = path.join("\0");
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: `serialized` is live; out-pointers outlive the call.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    match status {
        // SAFETY: the host allocated `size` bytes at `data` (or left it null).
        OK => Ok((!data.is_null()).then(|| unsafe { owned(data, size) })),
        NOT_FOUND => Ok(None),
        s => Err(error("get_property", s)),
    }
}

pub fn shared_get(key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: `key` is live; out-pointers outlive the call.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        OK => {
            // SAFETY: the host allocated `size` bytes at `data` (or left it null).
            let value = (!data.is_null()).then(|| unsafe { owned(data, size) });
            Ok((value, (cas != 0).then_some(cas)))
        }
        NOT_FOUND => Ok((None, None)),
        s => Err(error("get_shared_data", s)),
    }
}

pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()> {
    // SAFETY: `key` and `value` are live for the call.
    check("set_shared_data", unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    })
}

pub fn define_metric(kind: u32, name: &str) -> HostResult<u32> {
    let mut id = 0u32;
    // SAFETY: `name` is live; `id` outlives the call.
    check("define_metric", unsafe {
        proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id)
    })?;
    Ok(id)
}

pub fn increment_metric(id: u32, delta: i64) -> HostResult<()> {
    // SAFETY: no pointers.
    check("increment_metric", unsafe {
        proxy_increment_metric(id, delta)
    })
}

pub fn record_metric(id: u32, value: u64) -> HostResult<()> {
    // SAFETY: no pointers.
    check("record_metric", unsafe { proxy_record_metric(id, value) })
}

/// A local gRPC reply (HTTP 200, `grpc-status` and `grpc-message`, no metadata).
pub fn send_grpc_response(grpc_status: i32, message: &str) -> HostResult<()> {
    // A serialized header map with 0 pairs.
    let no_headers = 0u32.to_le_bytes();
    // SAFETY: `message` and `no_headers` are live for the call.
    check("send_local_response", unsafe {
        proxy_send_local_response(
            200,
            null(),
            0,
            message.as_ptr(),
            message.len(),
            no_headers.as_ptr(),
            no_headers.len(),
            grpc_status,
        )
    })
}

/// A proxy-wasm serialized header map: `u32 count`, per pair `u32 key len, u32 value len`, then
/// per pair `key \0 value \0`.
fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Answer the current request locally (not a gRPC response).
pub fn send_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
    let headers = serialize_headers(headers);
    // SAFETY: `body` and `headers` are live for the call.
    check("send_local_response", unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}
