//! libibverbs, loaded at run time; all of the RDMA path's `unsafe` lives here.
//!
//! The library is opened with `dlopen("libibverbs.so.1")` on first use, so the
//! program builds without rdma-core's headers and starts on hosts without it. The
//! structures below mirror `<infiniband/verbs.h>` of libibverbs' stable ABI
//! (`IBVERBS_1.1`, unchanged since rdma-core 13); `layouts_match_the_libibverbs_abi`
//! pins every size and offset the code relies on to the values a C compiler gives
//! for that header. `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq` and
//! `ibv_req_notify_cq` are inline functions in C that call through the context's
//! operation table: they are called the same way here.
//!
//! Three rules make the raw pointers sound:
//!
//! 1. **Verbs objects live exactly as long as their [`Endpoint`].** It owns the
//!    device context, protection domain, completion channel, completion queue, queue
//!    pair and every memory registration, and destroys them in dependency order.
//! 2. **Registered memory outlives its registration.** [`Endpoint::register`] is
//!    `unsafe`: its caller promises that the memory stays mapped until
//!    [`Endpoint::deregister`] (or the endpoint's drop) returns; after
//!    `ibv_dereg_mr` returns, the device no longer touches it. If deregistering fails
//!    the process aborts, as it cannot know whether the device still may.
//! 3. **A posted work request's buffers outlive it.** [`Endpoint::post_send`] is
//!    `unsafe`: its caller keeps the gathered memory registered and unchanged until
//!    the request's completion (or the flush after [`Endpoint::fail`]) was polled.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::io;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::TransportError;

/// The library's file name (the ABI-1 soname every distribution ships).
pub(crate) const LIBRARY: &str = "libibverbs.so.1";

/// `enum ibv_qp_type`: reliable connected.
const QPT_RC: c_int = 2;
/// `enum ibv_qp_state`.
const QPS_INIT: c_int = 1;
const QPS_RTR: c_int = 2;
const QPS_RTS: c_int = 3;
const QPS_ERR: c_int = 6;
/// `enum ibv_qp_attr_mask`.
const QP_STATE: c_int = 1;
const QP_ACCESS_FLAGS: c_int = 1 << 3;
const QP_PKEY_INDEX: c_int = 1 << 4;
const QP_PORT: c_int = 1 << 5;
const QP_AV: c_int = 1 << 7;
const QP_PATH_MTU: c_int = 1 << 8;
const QP_TIMEOUT: c_int = 1 << 9;
const QP_RETRY_CNT: c_int = 1 << 10;
const QP_RNR_RETRY: c_int = 1 << 11;
const QP_RQ_PSN: c_int = 1 << 12;
const QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
const QP_MIN_RNR_TIMER: c_int = 1 << 15;
const QP_SQ_PSN: c_int = 1 << 16;
const QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
const QP_DEST_QPN: c_int = 1 << 20;
/// `enum ibv_access_flags`.
pub(crate) const ACCESS_LOCAL_WRITE: c_int = 1;
pub(crate) const ACCESS_REMOTE_WRITE: c_int = 2;
/// `enum ibv_wr_opcode`.
const WR_RDMA_WRITE: c_int = 0;
const WR_RDMA_WRITE_WITH_IMM: c_int = 1;
/// `enum ibv_send_flags`.
const SEND_SIGNALED: c_uint = 1 << 1;
/// `enum ibv_wc_opcode`.
pub(crate) const WC_RECV_RDMA_WITH_IMM: c_int = 129;
/// `enum ibv_wc_flags`.
pub(crate) const WC_WITH_IMM: c_uint = 1 << 1;
/// `enum ibv_port_state`.
const PORT_ACTIVE: c_int = 4;
/// `IBV_LINK_LAYER_INFINIBAND`; everything else is addressed by GID.
pub(crate) const LINK_LAYER_INFINIBAND: u8 = 1;

/// Opaque verbs objects.
#[repr(C)]
struct Device {
    _opaque: [u8; 0],
}
#[repr(C)]
struct Pd {
    _opaque: [u8; 0],
}

/// `struct ibv_context` up to its operation table.
#[repr(C)]
struct Context {
    device: *mut Device,
    ops: ContextOps,
}

/// `struct ibv_context_ops`, up to `post_recv`.
#[repr(C)]
struct ContextOps {
    _before_poll: [*mut c_void; 11],
    poll_cq: unsafe extern "C" fn(*mut Cq, c_int, *mut Wc) -> c_int,
    req_notify_cq: unsafe extern "C" fn(*mut Cq, c_int) -> c_int,
    _before_post: [*mut c_void; 12],
    post_send: unsafe extern "C" fn(*mut Qp, *mut SendWr, *mut *mut SendWr) -> c_int,
    post_recv: unsafe extern "C" fn(*mut Qp, *mut RecvWr, *mut *mut RecvWr) -> c_int,
}

/// `struct ibv_cq`, up to its context.
#[repr(C)]
struct Cq {
    context: *mut Context,
}

/// `struct ibv_qp`, up to its number.
#[repr(C)]
struct Qp {
    context: *mut Context,
    qp_context: *mut c_void,
    pd: *mut Pd,
    send_cq: *mut Cq,
    recv_cq: *mut Cq,
    srq: *mut c_void,
    handle: u32,
    qp_num: u32,
}

/// `struct ibv_comp_channel`.
#[repr(C)]
struct CompChannel {
    context: *mut Context,
    fd: c_int,
    refcnt: c_int,
}

/// `struct ibv_mr`.
#[repr(C)]
struct Mr {
    context: *mut Context,
    pd: *mut Pd,
    addr: *mut c_void,
    length: usize,
    handle: u32,
    lkey: u32,
    rkey: u32,
}

/// `struct ibv_port_attr`.
#[repr(C)]
#[derive(Default)]
struct PortAttr {
    state: c_int,
    max_mtu: c_int,
    active_mtu: c_int,
    gid_tbl_len: c_int,
    port_cap_flags: u32,
    max_msg_sz: u32,
    bad_pkey_cntr: u32,
    qkey_viol_cntr: u32,
    pkey_tbl_len: u16,
    lid: u16,
    sm_lid: u16,
    lmc: u8,
    max_vl_num: u8,
    sm_sl: u8,
    subnet_timeout: u8,
    init_type_reply: u8,
    active_width: u8,
    active_speed: u8,
    phys_state: u8,
    link_layer: u8,
    flags: u8,
    port_cap_flags2: u16,
}

/// `union ibv_gid` (aligned as its two-u64 member).
#[repr(C, align(8))]
#[derive(Default)]
struct Gid([u8; 16]);

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Default)]
struct GlobalRoute {
    dgid: Gid,
    flow_label: u32,
    sgid_index: u8,
    hop_limit: u8,
    traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Default)]
struct AhAttr {
    grh: GlobalRoute,
    dlid: u16,
    sl: u8,
    src_path_bits: u8,
    static_rate: u8,
    is_global: u8,
    port_num: u8,
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Default)]
struct QpCap {
    max_send_wr: u32,
    max_recv_wr: u32,
    max_send_sge: u32,
    max_recv_sge: u32,
    max_inline_data: u32,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
struct QpInitAttr {
    qp_context: *mut c_void,
    send_cq: *mut Cq,
    recv_cq: *mut Cq,
    srq: *mut c_void,
    cap: QpCap,
    qp_type: c_int,
    sq_sig_all: c_int,
}

/// `struct ibv_qp_attr`.
#[repr(C)]
#[derive(Default)]
struct QpAttr {
    qp_state: c_int,
    cur_qp_state: c_int,
    path_mtu: c_int,
    path_mig_state: c_int,
    qkey: u32,
    rq_psn: u32,
    sq_psn: u32,
    dest_qp_num: u32,
    qp_access_flags: c_uint,
    cap: QpCap,
    ah_attr: AhAttr,
    alt_ah_attr: AhAttr,
    pkey_index: u16,
    alt_pkey_index: u16,
    en_sqd_async_notify: u8,
    sq_draining: u8,
    max_rd_atomic: u8,
    max_dest_rd_atomic: u8,
    min_rnr_timer: u8,
    port_num: u8,
    timeout: u8,
    retry_cnt: u8,
    rnr_retry: u8,
    alt_port_num: u8,
    alt_timeout: u8,
    rate_limit: u32,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sge {
    addr: u64,
    length: u32,
    lkey: u32,
}

/// `struct ibv_send_wr`, with its `wr` union as the `rdma` member.
#[repr(C)]
struct SendWr {
    wr_id: u64,
    next: *mut SendWr,
    sg_list: *mut Sge,
    num_sge: c_int,
    opcode: c_int,
    send_flags: c_uint,
    imm_data: u32,
    remote_addr: u64,
    rkey: u32,
    _rest_of_wr: [u32; 5],
    _qp_type: u32,
    _pad: u32,
    _bind_mw_or_tso: [u64; 6],
}

/// `struct ibv_recv_wr`.
#[repr(C)]
struct RecvWr {
    wr_id: u64,
    next: *mut RecvWr,
    sg_list: *mut Sge,
    num_sge: c_int,
}

/// `struct ibv_wc`: one work completion.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Wc {
    pub(crate) wr_id: u64,
    pub(crate) status: c_int,
    pub(crate) opcode: c_int,
    vendor_err: u32,
    pub(crate) byte_len: u32,
    /// Immediate data, in network byte order.
    pub(crate) imm_data: u32,
    qp_num: u32,
    src_qp: u32,
    pub(crate) wc_flags: c_uint,
    pkey_index: u16,
    slid: u16,
    sl: u8,
    dlid_path_bits: u8,
}

/// The exported functions used, resolved once.
struct Functions {
    get_device_list: unsafe extern "C" fn(*mut c_int) -> *mut *mut Device,
    free_device_list: unsafe extern "C" fn(*mut *mut Device),
    get_device_name: unsafe extern "C" fn(*mut Device) -> *const c_char,
    open_device: unsafe extern "C" fn(*mut Device) -> *mut Context,
    close_device: unsafe extern "C" fn(*mut Context) -> c_int,
    query_port: unsafe extern "C" fn(*mut Context, u8, *mut PortAttr) -> c_int,
    query_gid: unsafe extern "C" fn(*mut Context, u8, c_int, *mut [u8; 16]) -> c_int,
    alloc_pd: unsafe extern "C" fn(*mut Context) -> *mut Pd,
    dealloc_pd: unsafe extern "C" fn(*mut Pd) -> c_int,
    reg_mr: unsafe extern "C" fn(*mut Pd, *mut c_void, usize, c_int) -> *mut Mr,
    dereg_mr: unsafe extern "C" fn(*mut Mr) -> c_int,
    create_comp_channel: unsafe extern "C" fn(*mut Context) -> *mut CompChannel,
    destroy_comp_channel: unsafe extern "C" fn(*mut CompChannel) -> c_int,
    create_cq:
        unsafe extern "C" fn(*mut Context, c_int, *mut c_void, *mut CompChannel, c_int) -> *mut Cq,
    destroy_cq: unsafe extern "C" fn(*mut Cq) -> c_int,
    get_cq_event: unsafe extern "C" fn(*mut CompChannel, *mut *mut Cq, *mut *mut c_void) -> c_int,
    ack_cq_events: unsafe extern "C" fn(*mut Cq, c_uint),
    create_qp: unsafe extern "C" fn(*mut Pd, *mut QpInitAttr) -> *mut Qp,
    modify_qp: unsafe extern "C" fn(*mut Qp, *mut QpAttr, c_int) -> c_int,
    destroy_qp: unsafe extern "C" fn(*mut Qp) -> c_int,
    wc_status_str: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// The loaded library (never unloaded: providers it loaded stay in use).
struct Library {
    f: Functions,
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next
    // dl* call on this thread; it is copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dynamic loader error".into()
    } else {
        // SAFETY: non-NULL, NUL-terminated (see above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// The function pointer `F` at `p`.
///
/// # Safety
///
/// `p` must be a non-null pointer to a function whose C signature is `F`'s.
unsafe fn function<F: Copy>(p: *mut c_void) -> F {
    const { assert!(size_of::<F>() == size_of::<*mut c_void>()) };
    // SAFETY: `F` is a function pointer type of pointer size (checked above) and `p`
    // points to a function of that signature (the caller's promise).
    unsafe { std::mem::transmute_copy(&p) }
}

impl Library {
    fn load() -> Result<Self, String> {
        let name = CString::new(LIBRARY).unwrap_or_default();
        // SAFETY: dlopen takes a NUL-terminated file name; running the library's
        // initialisers is what loading it means (libibverbs' only register its
        // built-in provider table).
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(format!("{LIBRARY} not found ({})", dl_error()));
        }
        let symbol = |name: &str| -> Result<*mut c_void, String> {
            let c = CString::new(name).unwrap_or_default();
            // SAFETY: `handle` is a live dlopen handle, `c` NUL-terminated.
            let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
            if p.is_null() {
                Err(format!("{LIBRARY} lacks {name} ({})", dl_error()))
            } else {
                Ok(p)
            }
        };
        macro_rules! load {
            ($($field:ident = $name:literal),* $(,)?) => {
                Functions {
                    $(
                        // SAFETY: the symbol is libibverbs' exported function of that
                        // name, whose C signature (verbs.h, ABI IBVERBS_1.1) is the
                        // field's type; both are non-null code pointers.
                        $field: unsafe { function(symbol($name)?) },
                    )*
                }
            };
        }
        let f = load!(
            get_device_list = "ibv_get_device_list",
            free_device_list = "ibv_free_device_list",
            get_device_name = "ibv_get_device_name",
            open_device = "ibv_open_device",
            close_device = "ibv_close_device",
            query_port = "ibv_query_port",
            query_gid = "ibv_query_gid",
            alloc_pd = "ibv_alloc_pd",
            dealloc_pd = "ibv_dealloc_pd",
            reg_mr = "ibv_reg_mr",
            dereg_mr = "ibv_dereg_mr",
            create_comp_channel = "ibv_create_comp_channel",
            destroy_comp_channel = "ibv_destroy_comp_channel",
            create_cq = "ibv_create_cq",
            destroy_cq = "ibv_destroy_cq",
            get_cq_event = "ibv_get_cq_event",
            ack_cq_events = "ibv_ack_cq_events",
            create_qp = "ibv_create_qp",
            modify_qp = "ibv_modify_qp",
            destroy_qp = "ibv_destroy_qp",
            wc_status_str = "ibv_wc_status_str",
        );
        Ok(Self { f })
    }
}

/// The library, loaded on first use; the error says why it cannot be.
fn library() -> Result<&'static Library, TransportError> {
    static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(Library::load)
        .as_ref()
        .map_err(|why| TransportError::RdmaUnavailable(why.clone()))
}

fn verbs_error(what: &'static str, source: io::Error) -> TransportError {
    TransportError::Verbs { what, source }
}

/// An errno returned as a value (modify_qp, post_send...), or errno after a NULL.
fn returned(what: &'static str, rc: c_int) -> Result<(), TransportError> {
    if rc == 0 {
        Ok(())
    } else {
        let code = if rc < 0 { -rc } else { rc };
        Err(verbs_error(what, io::Error::from_raw_os_error(code)))
    }
}

fn non_null<T>(what: &'static str, p: *mut T) -> Result<NonNull<T>, TransportError> {
    NonNull::new(p).ok_or_else(|| verbs_error(what, io::Error::last_os_error()))
}

/// A port that can carry traffic, and how it is addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortInfo {
    /// The device's name (`rxe0`, `mlx5_0`).
    pub(crate) device: String,
    /// The port number (from 1).
    pub(crate) port: u8,
    /// `enum ibv_mtu` of the active MTU (1 = 256 ... 5 = 4096).
    pub(crate) mtu: u8,
    /// The port's LID (InfiniBand; 0 on RoCE).
    pub(crate) lid: u16,
    /// `IBV_LINK_LAYER_*`.
    pub(crate) link_layer: u8,
    /// Entries in the GID table.
    pub(crate) gids: u32,
}

/// An open device context.
struct Opened {
    lib: &'static Library,
    ctx: NonNull<Context>,
    info: PortInfo,
}

impl Drop for Opened {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from ibv_open_device and everything created on it was
        // destroyed before (Endpoint's drop order); a failure leaks the context only.
        unsafe { (self.lib.f.close_device)(self.ctx.as_ptr()) };
    }
}

/// Opens the device named `name` (or the first with port `port` active) and reads
/// the port's attributes. Fails if the port is not active.
fn open(name: Option<&str>, port: u8) -> Result<Opened, TransportError> {
    let lib = library()?;
    let mut count: c_int = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a NULL-terminated
    // array (or NULL), freed below after every use of its entries.
    let list = unsafe { (lib.f.get_device_list)(&mut count) };
    if list.is_null() {
        let e = io::Error::last_os_error();
        return Err(TransportError::RdmaUnavailable(
            if e.raw_os_error() == Some(libc::ENOSYS) {
                "this kernel has no RDMA support (no ib_uverbs)".into()
            } else {
                format!(
                    "no RDMA devices ({e}): load the driver, e.g. `rdma link add rxe0 type rxe netdev eth0` for Soft-RoCE"
                )
            },
        ));
    }
    let mut seen = Vec::new();
    let mut result = None;
    for i in 0..usize::try_from(count).unwrap_or(0) {
        // SAFETY: the list holds `count` device pointers.
        let dev = unsafe { *list.add(i) };
        // SAFETY: `dev` is a live device of the list; the name is NUL-terminated
        // and copied before the list is freed.
        let dev_name = unsafe { CStr::from_ptr((lib.f.get_device_name)(dev)) }
            .to_string_lossy()
            .into_owned();
        if name.is_some_and(|n| n != dev_name) {
            seen.push(dev_name);
            continue;
        }
        let attempt = open_one(lib, dev, &dev_name, port);
        seen.push(dev_name);
        match attempt {
            Ok(opened) => {
                result = Some(Ok(opened));
                break;
            }
            Err(e) if name.is_some() => {
                result = Some(Err(e));
                break;
            }
            Err(_) => {}
        }
    }
    // SAFETY: the list came from ibv_get_device_list; opened contexts stay valid.
    unsafe { (lib.f.free_device_list)(list) };
    result.unwrap_or_else(|| {
        Err(TransportError::RdmaUnavailable(match name {
            Some(n) => format!("no RDMA device named {n:?} (devices: {seen:?})"),
            None if seen.is_empty() => "no RDMA devices on this host (load the driver, e.g. `rdma link add rxe0 type rxe netdev eth0` for Soft-RoCE)".into(),
            None => format!("no RDMA device among {seen:?} has port {port} active"),
        }))
    })
}

fn open_one(
    lib: &'static Library,
    dev: *mut Device,
    name: &str,
    port: u8,
) -> Result<Opened, TransportError> {
    // SAFETY: `dev` is a live entry of the device list.
    let ctx = non_null("opening the RDMA device", unsafe {
        (lib.f.open_device)(dev)
    })?;
    let mut opened = Opened {
        lib,
        ctx,
        info: PortInfo {
            device: name.to_string(),
            port,
            mtu: 0,
            lid: 0,
            link_layer: 0,
            gids: 0,
        },
    };
    let mut attr = PortAttr::default();
    // SAFETY: `attr` is a full `struct ibv_port_attr` (the exported function fills
    // at most that much); the context is open.
    let rc = unsafe { (lib.f.query_port)(ctx.as_ptr(), port, &mut attr) };
    returned("querying the RDMA port", rc)?;
    if attr.state != PORT_ACTIVE {
        return Err(TransportError::RdmaUnavailable(format!(
            "port {port} of RDMA device {name} is not active (state {}): check the link with `rdma link show`",
            attr.state
        )));
    }
    opened.info.mtu = u8::try_from(attr.active_mtu).unwrap_or(1);
    opened.info.lid = attr.lid;
    opened.info.link_layer = attr.link_layer;
    opened.info.gids = u32::try_from(attr.gid_tbl_len).unwrap_or(0);
    Ok(opened)
}

/// Checks that libibverbs loads and that the device (or any device) has `port` active.
pub(crate) fn probe(device: Option<&str>, port: u8) -> Result<PortInfo, TransportError> {
    open(device, port).map(|o| o.info.clone())
}

/// One registered memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Registration {
    index: usize,
    /// The local key (for gather lists).
    pub(crate) lkey: u32,
    /// The remote key (for the peer's RDMA writes, if allowed).
    pub(crate) rkey: u32,
}

/// The verbs objects of an endpoint, destroyed in dependency order on drop; each is
/// `None` until created, so a failed construction cleans up what it made.
struct Owned {
    device: Opened,
    pd: Option<NonNull<Pd>>,
    channel: Option<NonNull<CompChannel>>,
    cq: Option<NonNull<Cq>>,
    qp: Option<NonNull<Qp>>,
    mrs: Vec<Option<NonNull<Mr>>>,
}

impl Drop for Owned {
    fn drop(&mut self) {
        let f = &self.device.lib.f;
        // Destroying the QP first stops all access through it; then the memory.
        if let Some(qp) = self.qp.take() {
            // SAFETY: the QP is live and destroyed once.
            unsafe { (f.destroy_qp)(qp.as_ptr()) };
        }
        for mr in self.mrs.drain(..).flatten() {
            dereg(f, mr);
        }
        if let Some(cq) = self.cq.take() {
            // SAFETY: the CQ is live, its QP is gone, every event was acknowledged.
            unsafe { (f.destroy_cq)(cq.as_ptr()) };
        }
        if let Some(channel) = self.channel.take() {
            // SAFETY: the channel is live and its CQ is gone.
            unsafe { (f.destroy_comp_channel)(channel.as_ptr()) };
        }
        if let Some(pd) = self.pd.take() {
            // SAFETY: the protection domain is live and nothing uses it any more.
            unsafe { (f.dealloc_pd)(pd.as_ptr()) };
        }
        // `device` closes the context when it drops, after this.
    }
}

/// A reliable-connected queue pair with everything it needs, on one port.
pub(crate) struct Endpoint {
    owned: Owned,
    f: &'static Functions,
    ctx: NonNull<Context>,
    channel: NonNull<CompChannel>,
    cq: NonNull<Cq>,
    qp: NonNull<Qp>,
    gid: [u8; 16],
    gid_index: u8,
}

/// What [`Endpoint::next`] saw.
#[derive(Debug)]
pub(crate) enum Woken {
    /// A work completion.
    Completion(Wc),
    /// The other file descriptor is readable (or closed).
    Readable,
    /// Neither, within the wait.
    Idle,
}

/// What a peer needs to connect its queue pair to this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Address {
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
    pub(crate) lid: u16,
    pub(crate) gid: [u8; 16],
    pub(crate) mtu: u8,
    pub(crate) link_layer: u8,
}

impl Endpoint {
    /// Opens the device, and creates a protection domain, a completion queue with a
    /// completion channel, and an RC queue pair of `send_wr`/`recv_wr` requests with
    /// up to `max_sge` gather entries each. `gid_index` picks the port's GID (by
    /// default the one [`super::gid::choose`] picks).
    pub(crate) fn open(
        device: Option<&str>,
        port: u8,
        gid_index: Option<u8>,
        send_wr: u32,
        recv_wr: u32,
        max_sge: u32,
    ) -> Result<Self, TransportError> {
        let device = open(device, port)?;
        let gid_index = match gid_index {
            Some(i) => i,
            None => super::gid::choose(&device.info)?,
        };
        let f = &device.lib.f;
        let ctx = device.ctx;
        let mut gid = [0u8; 16];
        // SAFETY: the context is open; `gid` is a 16-byte union ibv_gid.
        let rc = unsafe { (f.query_gid)(ctx.as_ptr(), port, c_int::from(gid_index), &mut gid) };
        returned("reading the port's GID", rc)?;
        if device.info.link_layer != LINK_LAYER_INFINIBAND && gid == [0; 16] {
            return Err(TransportError::RdmaUnavailable(format!(
                "GID index {gid_index} of {} port {port} is empty: give the port's network device an IP address, or pick a GID index listed by `ibv_devinfo -v`",
                device.info.device
            )));
        }
        let mut owned = Owned {
            device,
            pd: None,
            channel: None,
            cq: None,
            qp: None,
            mrs: Vec::new(),
        };
        // SAFETY: the context is open.
        let pd = non_null("allocating a protection domain", unsafe {
            (f.alloc_pd)(ctx.as_ptr())
        })?;
        owned.pd = Some(pd);
        // SAFETY: the context is open.
        let channel = non_null("creating a completion channel", unsafe {
            (f.create_comp_channel)(ctx.as_ptr())
        })?;
        owned.channel = Some(channel);
        let cqe = c_int::try_from(send_wr + recv_wr).unwrap_or(c_int::MAX);
        // SAFETY: the context and channel are live; no user context pointer.
        let cq = non_null("creating a completion queue", unsafe {
            (f.create_cq)(ctx.as_ptr(), cqe, ptr::null_mut(), channel.as_ptr(), 0)
        })?;
        owned.cq = Some(cq);
        let mut init = QpInitAttr {
            qp_context: ptr::null_mut(),
            send_cq: cq.as_ptr(),
            recv_cq: cq.as_ptr(),
            srq: ptr::null_mut(),
            cap: QpCap {
                max_send_wr: send_wr,
                max_recv_wr: recv_wr,
                max_send_sge: max_sge,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the protection domain and completion queue are live; `init` is a
        // complete ibv_qp_init_attr.
        let qp = non_null("creating a queue pair", unsafe {
            (f.create_qp)(pd.as_ptr(), &mut init)
        })?;
        owned.qp = Some(qp);
        Ok(Self {
            owned,
            f,
            ctx,
            channel,
            cq,
            qp,
            gid,
            gid_index,
        })
    }

    /// The port this endpoint uses.
    pub(crate) fn port(&self) -> &PortInfo {
        &self.owned.device.info
    }

    /// The GID index in use.
    pub(crate) fn gid_index(&self) -> u8 {
        self.gid_index
    }

    /// This queue pair's address, with `psn` as its first packet sequence number.
    pub(crate) fn address(&self, psn: u32) -> Address {
        // SAFETY: the queue pair is live; qp_num is set at creation and never changes.
        let qpn = unsafe { (*self.qp.as_ptr()).qp_num };
        let info = &self.owned.device.info;
        Address {
            qpn,
            psn,
            lid: info.lid,
            gid: self.gid,
            mtu: info.mtu,
            link_layer: info.link_layer,
        }
    }

    fn modify(
        &mut self,
        attr: &mut QpAttr,
        mask: c_int,
        what: &'static str,
    ) -> Result<(), TransportError> {
        // SAFETY: the queue pair is live; `attr` is a complete ibv_qp_attr.
        let rc = unsafe { (self.f.modify_qp)(self.qp.as_ptr(), attr, mask) };
        returned(what, rc)
    }

    /// Moves the queue pair to INIT, then RTR towards `remote` (starting at `psn`
    /// locally), then, if `send`, to RTS. `remote_write` lets the peer write into
    /// memory registered for it.
    pub(crate) fn connect(
        &mut self,
        local_psn: u32,
        remote: &Address,
        remote_write: bool,
        send: bool,
    ) -> Result<(), TransportError> {
        let port = self.owned.device.info.port;
        let mut attr = QpAttr {
            qp_state: QPS_INIT,
            port_num: port,
            qp_access_flags: if remote_write {
                ACCESS_REMOTE_WRITE as c_uint
            } else {
                0
            },
            ..QpAttr::default()
        };
        self.modify(
            &mut attr,
            QP_STATE | QP_PKEY_INDEX | QP_PORT | QP_ACCESS_FLAGS,
            "moving the queue pair to INIT",
        )?;
        let mut ah = AhAttr {
            dlid: remote.lid,
            port_num: port,
            ..AhAttr::default()
        };
        if self.owned.device.info.link_layer != LINK_LAYER_INFINIBAND || remote.lid == 0 {
            ah.is_global = 1;
            ah.grh = GlobalRoute {
                dgid: Gid(remote.gid),
                sgid_index: self.gid_index,
                hop_limit: 64,
                ..GlobalRoute::default()
            };
        }
        let mut attr = QpAttr {
            qp_state: QPS_RTR,
            path_mtu: c_int::from(self.owned.device.info.mtu.min(remote.mtu)),
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: ah,
            ..QpAttr::default()
        };
        self.modify(
            &mut attr,
            QP_STATE
                | QP_AV
                | QP_PATH_MTU
                | QP_DEST_QPN
                | QP_RQ_PSN
                | QP_MAX_DEST_RD_ATOMIC
                | QP_MIN_RNR_TIMER,
            "moving the queue pair to RTR (check the GID index and that both ports reach each other)",
        )?;
        if send {
            let mut attr = QpAttr {
                qp_state: QPS_RTS,
                // 4.096 us * 2^14 = 67 ms per try, 7 retries: a dead peer fails a
                // write within about half a second.
                timeout: 14,
                retry_cnt: 7,
                rnr_retry: 7,
                sq_psn: local_psn,
                max_rd_atomic: 1,
                ..QpAttr::default()
            };
            self.modify(
                &mut attr,
                QP_STATE
                    | QP_TIMEOUT
                    | QP_RETRY_CNT
                    | QP_RNR_RETRY
                    | QP_SQ_PSN
                    | QP_MAX_QP_RD_ATOMIC,
                "moving the queue pair to RTS",
            )?;
        }
        Ok(())
    }

    /// Moves the queue pair to the error state: every outstanding request completes
    /// at once with a flush error, and the device stops accessing their buffers.
    pub(crate) fn fail(&mut self) {
        let mut attr = QpAttr {
            qp_state: QPS_ERR,
            ..QpAttr::default()
        };
        // The connection is over either way; Endpoint's drop destroys the QP.
        let _ = self.modify(&mut attr, QP_STATE, "moving the queue pair to ERR");
    }

    /// Registers `len` bytes at `addr`; `access` is `ACCESS_*` flags.
    ///
    /// # Safety
    ///
    /// The memory must stay mapped until [`Endpoint::deregister`] or the endpoint's
    /// drop returns. With `ACCESS_REMOTE_WRITE` or `ACCESS_LOCAL_WRITE` the device may
    /// write it at any time meanwhile: the caller must not hold Rust references to it
    /// that assume it does not change.
    pub(crate) unsafe fn register(
        &mut self,
        addr: *mut u8,
        len: usize,
        access: c_int,
    ) -> Result<Registration, TransportError> {
        // SAFETY: the protection domain is live; the memory's validity is the
        // caller's promise.
        let mr = non_null(
            "registering memory (raise `ulimit -l` if this is ENOMEM)",
            unsafe {
                (self.f.reg_mr)(
                    self.owned.pd.map_or(ptr::null_mut(), NonNull::as_ptr),
                    addr.cast(),
                    len,
                    access,
                )
            },
        )?;
        // SAFETY: `mr` was just returned by ibv_reg_mr and is live.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        let mrs = &mut self.owned.mrs;
        let index = match mrs.iter().position(Option::is_none) {
            Some(i) => {
                mrs[i] = Some(mr);
                i
            }
            None => {
                mrs.push(Some(mr));
                mrs.len() - 1
            }
        };
        Ok(Registration { index, lkey, rkey })
    }

    /// Ends a registration: once this returns, the device no longer accesses the memory.
    pub(crate) fn deregister(&mut self, registration: Registration) {
        if let Some(mr) = self
            .owned
            .mrs
            .get_mut(registration.index)
            .and_then(Option::take)
        {
            dereg(self.f, mr);
        }
    }

    /// Posts receive requests without buffers (each is consumed by one RDMA WRITE
    /// with immediate data), with `wr_id`s `ids`.
    pub(crate) fn post_recvs(
        &mut self,
        ids: impl Iterator<Item = u64>,
    ) -> Result<(), TransportError> {
        for wr_id in ids {
            let mut wr = RecvWr {
                wr_id,
                next: ptr::null_mut(),
                sg_list: ptr::null_mut(),
                num_sge: 0,
            };
            let mut bad = ptr::null_mut();
            // SAFETY: the queue pair is live; the request has no buffers, and the
            // provider copies the request before returning.
            let rc = unsafe { (self.ops().post_recv)(self.qp.as_ptr(), &mut wr, &mut bad) };
            returned("posting a receive request", rc)?;
        }
        Ok(())
    }

    fn ops(&self) -> &ContextOps {
        // SAFETY: the context is open for the endpoint's life; the operation table
        // is filled by the provider at open and never changes.
        unsafe { &(*self.ctx.as_ptr()).ops }
    }

    /// Posts RDMA WRITEs of `writes` (each a gather list and the remote address it
    /// lands at), the last one signalled; if `imm` is given, the last is an RDMA
    /// WRITE with that immediate data (host order; sent in network order).
    ///
    /// # Safety
    ///
    /// Every gather entry must lie in memory registered on this endpoint that stays
    /// registered and unchanged until the signalled request's completion (or the
    /// flush after [`Endpoint::fail`]) has been polled.
    pub(crate) unsafe fn post_writes(
        &mut self,
        writes: &mut [(Vec<Sge>, u64)],
        rkey: u32,
        imm: Option<u32>,
        wr_id: u64,
    ) -> Result<(), TransportError> {
        let count = writes.len();
        let mut wrs: Vec<SendWr> = writes
            .iter_mut()
            .enumerate()
            .map(|(i, (sges, remote_addr))| {
                let last = i + 1 == count;
                SendWr {
                    wr_id,
                    next: ptr::null_mut(),
                    sg_list: sges.as_mut_ptr(),
                    num_sge: c_int::try_from(sges.len()).unwrap_or(c_int::MAX),
                    opcode: if last && imm.is_some() {
                        WR_RDMA_WRITE_WITH_IMM
                    } else {
                        WR_RDMA_WRITE
                    },
                    send_flags: if last { SEND_SIGNALED } else { 0 },
                    imm_data: if last { imm.unwrap_or(0).to_be() } else { 0 },
                    remote_addr: *remote_addr,
                    rkey,
                    _rest_of_wr: [0; 5],
                    _qp_type: 0,
                    _pad: 0,
                    _bind_mw_or_tso: [0; 6],
                }
            })
            .collect();
        let base = wrs.as_mut_ptr();
        for i in 1..count {
            // SAFETY: `i - 1` and `i` are inside `wrs`, which is not moved again.
            unsafe { (*base.add(i - 1)).next = base.add(i) };
        }
        let mut bad = ptr::null_mut();
        // SAFETY: the queue pair is live; the chained requests and their gather
        // lists live on this stack frame until the provider has copied them (it
        // does before returning); the gathered memory is the caller's promise.
        let rc = unsafe { (self.ops().post_send)(self.qp.as_ptr(), base, &mut bad) };
        returned("posting RDMA writes", rc)
    }

    /// Polls up to `wcs.len()` completions; returns how many were written.
    pub(crate) fn poll(&mut self, wcs: &mut [Wc]) -> Result<usize, TransportError> {
        let n = c_int::try_from(wcs.len()).unwrap_or(c_int::MAX);
        // SAFETY: the completion queue is live; `wcs` has room for `n` entries.
        let rc = unsafe { (self.ops().poll_cq)(self.cq.as_ptr(), n, wcs.as_mut_ptr()) };
        if rc < 0 {
            return Err(verbs_error(
                "polling the completion queue",
                io::Error::other(format!("ibv_poll_cq returned {rc}")),
            ));
        }
        Ok(rc as usize)
    }

    /// Asks for a completion event on the channel for the next completion.
    fn arm(&mut self) -> Result<(), TransportError> {
        // SAFETY: the completion queue is live.
        let rc = unsafe { (self.ops().req_notify_cq)(self.cq.as_ptr(), 0) };
        returned("arming the completion queue", rc)
    }

    fn poll_one(&mut self) -> Result<Option<Wc>, TransportError> {
        let mut wc = [Wc::default()];
        Ok((self.poll(&mut wc)? == 1).then_some(wc[0]))
    }

    /// The next completion, or `other` (a socket) becoming readable, waiting up to
    /// `wait` for either. A completion that arrived before the call is never missed
    /// (the queue is polled again after arming the event).
    pub(crate) fn next(
        &mut self,
        other: Option<RawFd>,
        wait: Duration,
    ) -> Result<Woken, TransportError> {
        if let Some(wc) = self.poll_one()? {
            return Ok(Woken::Completion(wc));
        }
        self.arm()?;
        if let Some(wc) = self.poll_one()? {
            return Ok(Woken::Completion(wc));
        }
        // SAFETY: the channel is live; fd is its file descriptor.
        let channel_fd = unsafe { (*self.channel.as_ptr()).fd };
        let mut fds = [
            libc::pollfd {
                fd: channel_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = c_int::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(c_int::MAX);
        // SAFETY: `fds` is a valid array of two pollfd (a negative fd is ignored).
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Woken::Idle);
            }
            return Err(verbs_error("waiting for a completion", e));
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let mut cq = ptr::null_mut();
            let mut context = ptr::null_mut();
            // SAFETY: the channel is readable, so this returns at once with the CQ
            // that raised the event (ours), which is acknowledged right away.
            let rc = unsafe { (self.f.get_cq_event)(self.channel.as_ptr(), &mut cq, &mut context) };
            if rc == 0 {
                // SAFETY: `cq` is our live completion queue, with one event unacked.
                unsafe { (self.f.ack_cq_events)(cq, 1) };
            }
            if let Some(wc) = self.poll_one()? {
                return Ok(Woken::Completion(wc));
            }
        }
        Ok(if fds[1].revents != 0 {
            Woken::Readable
        } else {
            Woken::Idle
        })
    }

    /// The text libibverbs gives for a completion status.
    pub(crate) fn status_text(&self, status: c_int) -> String {
        // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any value.
        unsafe { CStr::from_ptr((self.f.wc_status_str)(status)) }
            .to_string_lossy()
            .into_owned()
    }
}

fn dereg(f: &Functions, mr: NonNull<Mr>) {
    // SAFETY: `mr` came from ibv_reg_mr and is deregistered once (it was taken out
    // of the endpoint's table).
    if unsafe { (f.dereg_mr)(mr.as_ptr()) } != 0 {
        // The device may still access memory the caller is about to release.
        std::process::abort();
    }
}

// SAFETY: an endpoint is used by one thread at a time (`&mut self` for every
// operation); libibverbs objects may be used from any thread.
unsafe impl Send for Endpoint {}

/// The gather entry for `part` (at most 4 GiB), registered as `lkey`.
pub(crate) fn sge(part: &[u8], lkey: u32) -> Sge {
    Sge {
        addr: part.as_ptr() as u64,
        length: u32::try_from(part.len()).unwrap_or(u32::MAX),
        lkey,
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    /// Sizes and offsets printed by a C program compiled against rdma-core 44's
    /// verbs.h (Debian 12's libibverbs-dev): `offsetof` and `sizeof` of each.
    #[test]
    fn layouts_match_the_libibverbs_abi() {
        assert_eq!(size_of::<GlobalRoute>(), 24);
        assert_eq!(align_of::<AhAttr>(), 8);
        assert_eq!(size_of::<AhAttr>(), 32);
        assert_eq!(offset_of!(AhAttr, dlid), 24);
        assert_eq!(offset_of!(AhAttr, port_num), 30);
        assert_eq!(size_of::<QpCap>(), 20);
        assert_eq!(size_of::<QpInitAttr>(), 64);
        assert_eq!(offset_of!(QpInitAttr, cap), 32);
        assert_eq!(offset_of!(QpInitAttr, qp_type), 52);
        assert_eq!(size_of::<QpAttr>(), 144);
        assert_eq!(offset_of!(QpAttr, cap), 36);
        assert_eq!(offset_of!(QpAttr, ah_attr), 56);
        assert_eq!(offset_of!(QpAttr, pkey_index), 120);
        assert_eq!(offset_of!(QpAttr, min_rnr_timer), 128);
        assert_eq!(offset_of!(QpAttr, rnr_retry), 132);
        assert_eq!(offset_of!(QpAttr, rate_limit), 136);
        assert_eq!(size_of::<Sge>(), 16);
        assert_eq!(size_of::<SendWr>(), 128);
        assert_eq!(offset_of!(SendWr, imm_data), 36);
        assert_eq!(offset_of!(SendWr, remote_addr), 40);
        assert_eq!(offset_of!(SendWr, rkey), 48);
        assert_eq!(offset_of!(SendWr, _qp_type), 72);
        assert_eq!(offset_of!(SendWr, _bind_mw_or_tso), 80);
        assert_eq!(size_of::<RecvWr>(), 32);
        assert_eq!(size_of::<Wc>(), 48);
        assert_eq!(offset_of!(Wc, byte_len), 20);
        assert_eq!(offset_of!(Wc, imm_data), 24);
        assert_eq!(offset_of!(Wc, wc_flags), 36);
        assert_eq!(offset_of!(Mr, lkey), 36);
        assert_eq!(offset_of!(Mr, rkey), 40);
        assert_eq!(offset_of!(Qp, qp_num), 52);
        assert_eq!(offset_of!(CompChannel, fd), 8);
        assert_eq!(
            offset_of!(Context, ops) + offset_of!(ContextOps, poll_cq),
            96
        );
        assert_eq!(
            offset_of!(Context, ops) + offset_of!(ContextOps, req_notify_cq),
            104
        );
        assert_eq!(
            offset_of!(Context, ops) + offset_of!(ContextOps, post_send),
            208
        );
        assert_eq!(
            offset_of!(Context, ops) + offset_of!(ContextOps, post_recv),
            216
        );
        assert_eq!(size_of::<PortAttr>(), 52);
        assert_eq!(offset_of!(PortAttr, active_mtu), 8);
        assert_eq!(offset_of!(PortAttr, gid_tbl_len), 12);
        assert_eq!(offset_of!(PortAttr, lid), 34);
        assert_eq!(offset_of!(PortAttr, link_layer), 46);
    }
}
