#if canImport(Glibc)
import Glibc
#endif
import NIOCore

/// Linux's `struct tcp_info` as far as tcpi_min_rtt (kernel 4.6). Glibc's `tcp_info`, which
/// NIO's getTCPInfo returns, stops at tcpi_total_retrans; the kernel fills as much as it is asked
/// for and NIO zeroes the rest, so a kernel without a field reads 0.
struct KernelTCPInfo {
    var base = tcp_info()
    var pacingRate: UInt64 = 0
    var maxPacingRate: UInt64 = 0
    /// tcpi_bytes_acked: the running count `DeliveryRate` sizes a subflow's queues by.
    var bytesAcked: UInt64 = 0
    /// tcpi_bytes_received: what the peer sent, read or not (`FirstBytesClassifier`).
    var bytesReceived: UInt64 = 0
    // Unread, but the kernel's layout puts them before tcpi_min_rtt.
    var segmentsOut: UInt32 = 0
    var segmentsIn: UInt32 = 0
    var notSentBytes: UInt32 = 0
    /// tcpi_min_rtt (kernel 4.6), µs: the path's round trip without our queue in it.
    var minRTT: UInt32 = 0

    static let synSent: UInt8 = 2
    /// tcpi_state: TCP_ESTABLISHED (1), TCP_SYN_SENT (2), ...
    var state: UInt8 { base.tcpi_state }
}

extension KernelTCPInfo: @unchecked Sendable {}

extension SocketOptionProvider {
    func getKernelTCPInfo() -> EventLoopFuture<KernelTCPInfo> {
        unsafeGetSocketOption(level: .tcp, name: .tcp_info)
    }
}
