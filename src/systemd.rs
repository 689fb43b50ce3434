//! sd_notify(3) in a few lines: READY=1 once the daemon can deliver, STOPPING=1 when it
//! drains. Does nothing outside systemd.

use std::os::unix::net::UnixDatagram;

pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let path = path.to_string_lossy();
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &*path)
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}
