internal import CMnl
import NIOConcurrencyHelpers
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Watches the links and addresses of the network namespace the process runs in, over a
/// NETLINK_ROUTE socket (libmnl), and reports changes as ``InterfaceEvent``s.
///
/// It subscribes to RTMGRP_LINK, RTMGRP_IPV4_IFADDR and RTMGRP_IPV6_IFADDR, then dumps links and
/// addresses, then reports only differences. When the kernel reports lost messages (ENOBUFS) it
/// dumps again and reports the difference against what it had. No privileges are needed.
///
/// One dedicated thread reads the socket; ``stop()`` wakes it through an eventfd and joins it.
public final class NetlinkInterfaceMonitor: InterfaceMonitor {
    private enum Phase {
        case idle
        case starting
        case running(pthread_t)
        case stopped
    }

    private let hub: EventHub
    private let reader: Reader
    private let phase = NIOLockedValueBox(Phase.idle)

    /// - Parameters:
    ///   - receiveBufferSize: SO_RCVBUF for the netlink socket (0 keeps the system default).
    ///   - debugLog: receives one line per unusual thing (skipped messages, overruns, re-dumps).
    public init(receiveBufferSize: Int = 1 << 20, debugLog: (@Sendable (String) -> Void)? = nil) throws {
        let socket = try NetlinkSocket(receiveBufferSize: receiveBufferSize)
        hub = EventHub()
        reader = Reader(socket: socket, hub: hub, log: debugLog)
    }

    deinit { stop() }

    /// Dumps the current state (the snapshot is complete when this returns) and starts the reader
    /// thread. Subscribers registered before `start()` see the dump as events.
    public func start() throws {
        try phase.withLockedValue { phase in
            guard case .idle = phase else {
                if case .stopped = phase { throw NetlinkMonitorError.stopped }
                throw NetlinkMonitorError.alreadyStarted
            }
            phase = .starting
        }
        let outcome = reader.resynchronize()
        try phase.withLockedValue { phase in
            guard case .starting = phase else {
                // stop() ran during the dump and left closing the socket to us.
                reader.socket.close()
                throw NetlinkMonitorError.stopped
            }
            switch outcome {
            case .complete:
                break
            case .stopped:
                phase = .stopped
                reader.socket.close()
                throw NetlinkMonitorError.stopped
            case .failed(let error):
                phase = .stopped
                reader.socket.close()
                hub.finish()
                throw error
            }
            let reader = self.reader
            phase = .running(try spawnThread { reader.run() })
        }
    }

    public var snapshot: InterfaceTable { hub.snapshot }

    public var events: AsyncStream<InterfaceEvent> { hub.subscribe() }

    /// How many times the monitor re-dumped because messages were lost.
    public var overrunCount: Int { reader.overruns.load(ordering: .relaxed) }

    public func stop() {
        let previous = phase.withLockedValue { phase in
            defer { phase = .stopped }
            return phase
        }
        switch previous {
        case .stopped:
            return
        case .idle:
            reader.socket.close()
        case .starting:
            // start() is inside a dump on its own thread; waking it makes it close the socket.
            reader.socket.wake()
        case .running(let thread):
            reader.socket.wake()
            if pthread_equal(thread, pthread_self()) == 0 {
                pthread_join(thread, nil)
                reader.socket.close()
            } else {
                // Called from the reader thread itself (a debugLog callback): it exits when this
                // returns, and the socket's deinit closes it.
                pthread_detach(thread)
            }
        }
        hub.finish()
    }
}

// MARK: - Reader

/// Everything the reader thread touches. Only one thread uses `socket`, `buffer` and `sequence` at
/// a time: the caller of `start()` until the thread exists, then the thread.
private final class Reader: @unchecked Sendable {
    let socket: NetlinkSocket
    let hub: EventHub
    let log: (@Sendable (String) -> Void)?
    let overruns = Atomic<Int>(0)
    private var sequence: UInt32
    // Dump replies are built by the kernel in skbs of up to 32 KiB when the reader's buffer allows.
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)

    enum Outcome {
        case complete
        case stopped
        case failed(NetlinkMonitorError)
    }

    init(socket: NetlinkSocket, hub: EventHub, log: (@Sendable (String) -> Void)?) {
        self.socket = socket
        self.hub = hub
        self.log = log
        self.sequence = UInt32(truncatingIfNeeded: time(nil))
    }

    deinit { buffer.deallocate() }

    func run() {
        while true {
            switch socket.receive(into: buffer) {
            case .stopped:
                return
            case .overrun:
                overruns.add(1, ordering: .relaxed)
                log?("netlink: receive queue overrun (ENOBUFS); re-dumping")
                if case .stopped = resynchronizeReporting() { return }
            case .failed(let code):
                log?("netlink: receive failed, errno \(code); monitor stops")
                hub.finish()
                return
            case .data(let count):
                let messages: [(header: NetlinkHeader, message: NetlinkMessage)]
                do {
                    messages = try parseNetlinkMessagesWithHeaders(Array(buffer.prefix(count)))
                } catch {
                    log?("netlink: unparsable datagram (\(error)); re-dumping")
                    if case .stopped = resynchronizeReporting() { return }
                    continue
                }
                logSkipped(messages.map(\.message))
                hub.update { $0.apply(messages.map(\.message)) }
            }
        }
    }

    private func resynchronizeReporting() -> Outcome {
        let outcome = resynchronize()
        if case .failed(let error) = outcome {
            // Keep listening: the table is stale but events still arrive, and the next overrun
            // or error triggers another attempt.
            log?("netlink: re-dump failed: \(error)")
        }
        return outcome
    }

    /// Dumps links, then IPv4 and IPv6 addresses, applying replies and any events interleaved with
    /// them in arrival order (the socket queue orders them correctly), then removes whatever the
    /// dump no longer mentions. Repeats when the kernel flags the dump as interrupted or events were
    /// lost meanwhile.
    func resynchronize() -> Outcome {
        for attempt in 1...5 {
            hub.update { $0.beginResync(); return [] }
            var consistent = true
            let requests: [(UInt16, UInt8)] = [
                (UInt16(RTM_GETLINK), UInt8(AF_UNSPEC)),
                (UInt16(RTM_GETADDR), UInt8(AF_INET)),
                (UInt16(RTM_GETADDR), UInt8(AF_INET6)),
            ]
            for (type, family) in requests {
                switch dump(type: type, family: family) {
                case .complete(let wasConsistent):
                    consistent = consistent && wasConsistent
                case .stopped:
                    hub.update { $0.cancelResync(); return [] }
                    return .stopped
                case .failed(let error):
                    hub.update { $0.cancelResync(); return [] }
                    return .failed(error)
                }
            }
            if consistent {
                hub.update { $0.finishResync() }
                return .complete
            }
            log?("netlink: dump attempt \(attempt) was inconsistent; dumping again")
            hub.update { $0.cancelResync(); return [] }
        }
        return .failed(.dumpNeverConsistent)
    }

    private enum DumpOutcome {
        case complete(consistent: Bool)
        case stopped
        case failed(NetlinkMonitorError)
    }

    private func dump(type: UInt16, family: UInt8) -> DumpOutcome {
        sequence &+= 1
        let sequence = self.sequence
        do {
            try socket.requestDump(type: type, family: family, sequence: sequence)
        } catch {
            return .failed(error)
        }
        var consistent = true
        while true {
            switch socket.receive(into: buffer) {
            case .stopped:
                return .stopped
            case .failed(let code):
                return .failed(.receiveFailed(errno: code))
            case .overrun:
                // Multicast events were dropped; the dump itself is paced by our reads and goes
                // on, but the result cannot be trusted.
                overruns.add(1, ordering: .relaxed)
                log?("netlink: overrun during dump")
                consistent = false
            case .data(let count):
                let messages: [(header: NetlinkHeader, message: NetlinkMessage)]
                do {
                    messages = try parseNetlinkMessagesWithHeaders(Array(buffer.prefix(count)))
                } catch {
                    return .failed(.unparsableReply(error))
                }
                logSkipped(messages.map(\.message))
                hub.update { $0.apply(messages.map(\.message)) }
                for (header, message) in messages
                where header.sequence == sequence && header.portID == socket.portID {
                    if header.isDumpInterrupted { consistent = false }
                    switch message {
                    case .done, .ack: return .complete(consistent: consistent)
                    case .error(let code): return .failed(.dumpFailed(errno: code))
                    default: break
                    }
                }
            }
        }
    }

    private func logSkipped(_ messages: [NetlinkMessage]) {
        guard let log else { return }
        for message in messages {
            switch message {
            case .other(let type): log("netlink: skipped message type \(type)")
            case .malformed(let type, let error): log("netlink: skipped malformed message type \(type): \(error)")
            default: break
            }
        }
    }
}

// MARK: - Thread

private final class ThreadBody {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

private func spawnThread(_ body: @escaping @Sendable () -> Void) throws(NetlinkMonitorError) -> pthread_t {
    var thread = pthread_t()
    let context = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    let rc = pthread_create(&thread, nil, { context in
        let body = Unmanaged<ThreadBody>.fromOpaque(context!).takeRetainedValue()
        _ = cmnl_set_thread_name("nbs-netlink")
        body.body()
        return nil
    }, context)
    guard rc == 0 else {
        Unmanaged<ThreadBody>.fromOpaque(context).release()
        throw .openFailed(errno: rc)
    }
    return thread
}
