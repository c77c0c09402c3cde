internal import CMnl
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Errors from the netlink monitor's socket and its dumps. Values are positive errnos.
public enum NetlinkMonitorError: Error, Sendable, Hashable {
    case openFailed(errno: Int32)
    case bindFailed(errno: Int32)
    case sendFailed(errno: Int32)
    case receiveFailed(errno: Int32)
    /// The kernel answered a dump request with an error.
    case dumpFailed(errno: Int32)
    /// A dump reply could not be framed.
    case unparsableReply(NetlinkParseError)
    /// The dump was still inconsistent (NLM_F_DUMP_INTR or overruns) after several attempts.
    case dumpNeverConsistent
    case alreadyStarted
    case stopped
}

/// A NETLINK_ROUTE socket from libmnl, plus an eventfd that wakes a blocked reader.
///
/// Not thread-safe by itself: one thread at a time reads and writes it (the caller of `start()`
/// during the first dump, then the reader thread). `wake()` is the exception: writing an eventfd
/// is safe from anywhere, which is the point of it.
final class NetlinkSocket: @unchecked Sendable {
    private let socket: OpaquePointer
    private let wakeFD: Int32
    let portID: UInt32
    private var closed = false

    enum Received {
        case data(Int)
        /// ENOBUFS (the kernel dropped messages for us) or a datagram bigger than our buffer.
        case overrun
        case stopped
        case failed(errno: Int32)
    }

    init(receiveBufferSize: Int) throws(NetlinkMonitorError) {
        guard let socket = mnl_socket_open(NETLINK_ROUTE) else { throw .openFailed(errno: errno) }
        let fd = mnl_socket_get_fd(socket)
        if receiveBufferSize > 0 {
            // A bigger queue makes ENOBUFS rarer during bursts (many addresses at once). FORCE
            // exceeds net.core.rmem_max but needs CAP_NET_ADMIN, so fall back quietly.
            var size = Int32(clamping: receiveBufferSize)
            if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 {
                _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            }
        }
        // Joining the groups at bind time, before any dump is sent, is what makes "subscribe, then
        // dump" lossless: every change after this point is queued for us.
        let groups = cmnl_rtmgrp_link() | cmnl_rtmgrp_ipv4_ifaddr() | cmnl_rtmgrp_ipv6_ifaddr()
        guard mnl_socket_bind(socket, groups, cmnl_socket_autopid()) == 0 else {
            let code = errno
            mnl_socket_close(socket)
            throw .bindFailed(errno: code)
        }
        // Non-blocking so that poll() decides when to read and a spurious wakeup cannot park the
        // reader in recv where stop() could not reach it.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let wakeFD = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard wakeFD >= 0 else {
            let code = errno
            mnl_socket_close(socket)
            throw .openFailed(errno: code)
        }
        self.socket = socket
        self.wakeFD = wakeFD
        self.portID = mnl_socket_get_portid(socket)
    }

    /// Sends a dump request for `type` (RTM_GETLINK or RTM_GETADDR) and `family`.
    func requestDump(type: UInt16, family: UInt8, sequence: UInt32) throws(NetlinkMonitorError) {
        var buffer = [UInt8](repeating: 0, count: 64)
        let sent = buffer.withUnsafeMutableBytes { raw -> Int in
            let nlh = mnl_nlmsg_put_header(raw.baseAddress)!
            nlh.pointee.nlmsg_type = type
            nlh.pointee.nlmsg_flags = UInt16(NLM_F_REQUEST | NLM_F_DUMP)
            nlh.pointee.nlmsg_seq = sequence
            if type == UInt16(RTM_GETLINK) {
                let ifi = mnl_nlmsg_put_extra_header(nlh, MemoryLayout<ifinfomsg>.size)!
                    .assumingMemoryBound(to: ifinfomsg.self)
                ifi.pointee.ifi_family = family
            } else {
                let ifa = mnl_nlmsg_put_extra_header(nlh, MemoryLayout<ifaddrmsg>.size)!
                    .assumingMemoryBound(to: ifaddrmsg.self)
                ifa.pointee.ifa_family = family
            }
            return mnl_socket_sendto(socket, nlh, Int(nlh.pointee.nlmsg_len))
        }
        if sent < 0 { throw .sendFailed(errno: errno) }
    }

    /// Waits for a datagram or for `wake()`, whichever comes first; `wake()` wins ties.
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Received {
        var fds = [
            pollfd(fd: mnl_socket_get_fd(socket), events: Int16(POLLIN), revents: 0),
            pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
        ]
        while true {
            fds[0].revents = 0
            fds[1].revents = 0
            let ready = poll(&fds, nfds_t(fds.count), -1)
            if ready < 0 {
                if errno == EINTR { continue }
                return .failed(errno: errno)
            }
            if fds[1].revents != 0 { return .stopped }
            if fds[0].revents == 0 { continue }
            let count = mnl_socket_recvfrom(socket, buffer.baseAddress, buffer.count)
            if count >= 0 { return .data(count) }
            switch errno {
            case EAGAIN, EWOULDBLOCK, EINTR: continue
            // libmnl turns MSG_TRUNC into ENOSPC: part of a datagram is gone, like an overrun.
            case ENOBUFS, ENOSPC: return .overrun
            case let code: return .failed(errno: code)
            }
        }
    }

    /// Makes every current and future `receive` return `.stopped`. The eventfd is never drained.
    func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, MemoryLayout<UInt64>.size)
    }

    /// Only once no thread can be inside `receive` (the reader has been joined).
    func close() {
        guard !closed else { return }
        closed = true
        mnl_socket_close(socket)
        Glibc.close(wakeFD)
    }

    deinit { close() }
}
