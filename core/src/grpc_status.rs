//! gRPC status codes by name (the `grpc-status` trailer), as in `google.rpc.Code`.

pub const OK: u32 = 0;
pub const CANCELLED: u32 = 1;
pub const INVALID_ARGUMENT: u32 = 3;
pub const NOT_FOUND: u32 = 5;
pub const ALREADY_EXISTS: u32 = 6;
pub const PERMISSION_DENIED: u32 = 7;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const FAILED_PRECONDITION: u32 = 9;
pub const OUT_OF_RANGE: u32 = 11;
pub const UNAVAILABLE: u32 = 14;
pub const UNAUTHENTICATED: u32 = 16;
