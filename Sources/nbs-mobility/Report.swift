import Crypto
import Foundation
import NameBasedSockets
import NIOCore

/// Receiver-side checksum, byte count and the longest gap between deliveries.
struct ReceiveMeter {
    private var hash = SHA256()
    private(set) var bytes = 0
    private var last: ContinuousClock.Instant?
    private(set) var maxStall: Duration = .zero
    /// When the longest stall began.
    private(set) var maxStallStart: ContinuousClock.Instant?
    /// Every gap of `listedGap` or more, in order, so a scenario can look at the stall after its
    /// fault rather than at start-up, and a benchmark can say how long it was when it was short (a
    /// list from 100 ms could not show a link-down gap a tenth of MPTCP's 300-600 ms). Past
    /// `listedGapLimit` of them the shortest listed gives way to a longer one, so that the longest
    /// gap after a fault late in a long transfer is still there; `unlistedGaps` counts those left out.
    static let listedGap: Duration = .milliseconds(20)
    static let listedGapLimit = 1_000
    private(set) var stalls: [(start: ContinuousClock.Instant, length: Duration)] = []
    private(set) var unlistedGaps = 0
    private(set) var first: ContinuousClock.Instant?
    private(set) var lastAt: ContinuousClock.Instant?

    /// One arrival: what a read returned, as the slices it came in (`Session.readSegments`).
    /// Returns the arrival's bytes.
    @discardableResult
    mutating func record(_ segments: [ByteBuffer], at now: ContinuousClock.Instant = .now) -> Int {
        if let last {
            if now - last >= Self.listedGap { list((last, now - last)) }
            if now - last > maxStall {
                maxStall = now - last
                maxStallStart = last
            }
        } else {
            first = now
        }
        last = now
        lastAt = now
        var arrived = 0
        for segment in segments {
            arrived += segment.readableBytes
            segment.withUnsafeReadableBytes { hash.update(bufferPointer: $0) }
        }
        bytes += arrived
        return arrived
    }

    private mutating func list(_ gap: (start: ContinuousClock.Instant, length: Duration)) {
        guard stalls.count >= Self.listedGapLimit else { return stalls.append(gap) }
        unlistedGaps += 1
        guard let shortest = stalls.indices.min(by: { stalls[$0].length < stalls[$1].length }),
              stalls[shortest].length < gap.length else { return }
        stalls.remove(at: shortest)
        stalls.append(gap)
    }

    var digest: String { hex(hash.finalize()) }
}

/// Bytes received per fixed-width bin since an origin (the session's accept): the receive rate over
/// time, for plotting a transfer through a fault next to kernel MPTCP's (tools/mptcp_xfer.py writes
/// the same format).
struct ReceiveTimeline {
    let origin: ContinuousClock.Instant
    let bin: Duration
    private(set) var bins: [Int] = []
    /// 2^20 bins (29 h at 100 ms) bound the memory whatever the run's length.
    static let maxBins = 1 << 20

    init(origin: ContinuousClock.Instant, bin: Duration = .milliseconds(100)) {
        self.origin = origin
        self.bin = bin
    }

    mutating func record(_ bytes: Int, at now: ContinuousClock.Instant = .now) {
        let index = max(0, Int(((now - origin) / bin).rounded(.down)))
        guard index < Self.maxBins else { return }
        if index >= bins.count { bins.append(contentsOf: repeatElement(0, count: index + 1 - bins.count)) }
        bins[index] += bytes
    }

    /// One line per bin, "t_ms bytes", t_ms the bin's start; empty bins included, so a stall shows as zeros.
    var text: String {
        let ms = Int(bin.seconds * 1000)
        return bins.enumerated().map { "\($0.offset * ms) \($0.element)\n" }.joined()
    }
}

/// An address and port as people write them: 192.0.2.1:443, [2001:db8::1]:443.
func endpoint(_ address: SocketAddress) -> String {
    guard let ip = address.ipAddress else { return address.description }
    return ip.contains(":") ? "[\(ip)]:\(address.port ?? 0)" : "\(ip):\(address.port ?? 0)"
}

func describe(_ event: SessionEvent) -> String {
    switch event {
    case .subflowUp(let s): "subflow \(s.id) up \(s.local.ipAddress ?? "?") -> \(s.remote.ipAddress ?? "?")\(s.interface.map { " on \($0)" } ?? "")"
    case .subflowDown(let s, let reason): "subflow \(s.id) down \(s.local.ipAddress ?? "?") -> \(s.remote.ipAddress ?? "?"): \(reason)"
    case .subflowStalled(let s, let ms): "subflow \(s.id) stalled (nothing acknowledged for \(ms) ms) \(s.local.ipAddress ?? "?") -> \(s.remote.ipAddress ?? "?"): probing"
    case .subflowRebound(let s, let from): "subflow \(s.id) peer moved \(endpoint(from)) -> \(endpoint(s.remote)) (NAT rebinding, path checked)"
    case .reinjected(let bytes, let from): "reinjected \(bytes) bytes from subflow \(from)"
    case .addressAnnounced(let a): "peer announced \(a.ipAddress ?? "?")"
    case .addressRemoved(let a): "peer removed \(a.ipAddress ?? "?")"
    case .localAddressAdded(let a, let interface): "address \(a.ipAddress ?? "?") added on \(interface)"
    case .localAddressRemoved(let a): "address \(a.ipAddress ?? "?") removed"
    case .interfaceDown(let name): "link \(name) down"
    case .peerResolved(let name, let addresses): "re-resolved \(name) -> \(addresses.compactMap(\.ipAddress).joined(separator: ", "))"
    case .waiting: "waiting: no path left"
    case .resumed: "resumed"
    case .closed: "closed"
    case .failed(let e): "failed: \(e)"
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

struct TransferReport {
    let role: String
    let localName: String
    let peerName: String
    let verification: String
    let started = ContinuousClock.now
    /// Wall-clock time of `started`: where a benchmark's other clocks meet this report's times.
    let startedUnix = Date().timeIntervalSince1970
    var bytes = 0
    var sha256 = ""
    var seconds = 0.0
    /// From the report's start (a server's accept) to the last byte received: unlike `seconds`,
    /// which starts at the first byte, it counts a session's start-up, when a first segment held on
    /// a slow subflow can keep every later byte from the application (and `seconds` short).
    var secondsSinceStart = 0.0
    var maxStallMs = 0.0
    /// Seconds from the start of the report to the beginning of the longest stall.
    var maxStallAt: Double?
    var stalls: [(at: Double, ms: Double)] = []
    var unlistedStalls = 0
    var subflowsMax = 0
    var reinjected = 0
    var subflows: [SubflowInfo] = []
    var events: [(Double, String)] = []
    var echoBytes: Int?
    var echoSHA256: String?
    /// `cat`: what this side sent, next to what it received (`bytes`, `sha256`).
    var sentBytes: Int?
    var sentSHA256: String?
    var completed = false
    var error: String?

    init(role: String, session: Session) {
        self.role = role
        localName = session.localName
        peerName = session.peerName
        verification = session.peerVerification.rawValue
    }

    var elapsed: Double { (ContinuousClock.now - started).seconds }

    mutating func fill(receiver: ReceiveMeter) {
        bytes = receiver.bytes
        sha256 = receiver.digest
        maxStallMs = receiver.maxStall.seconds * 1000
        maxStallAt = receiver.maxStallStart.map { ($0 - started).seconds }
        stalls = receiver.stalls.map { (($0.start - started).seconds, $0.length.seconds * 1000) }
        unlistedStalls = receiver.unlistedGaps
        if let first = receiver.first, let last = receiver.lastAt, last > first {
            seconds = (last - first).seconds
        } else {
            seconds = elapsed
        }
        secondsSinceStart = receiver.lastAt.map { ($0 - started).seconds } ?? elapsed
    }

    mutating func finish(_ tracked: TrackedSession) async {
        subflows = await tracked.session.subflows
        let stats = await tracked.session.statistics
        subflowsMax = stats.maxConcurrentSubflows
        reinjected = stats.reinjectedBytes
        events = await tracked.allEvents.map { ($0.t, describe($0.event)) }
        tracked.markFinished(completed ? "completed" : "FAILED")
    }

    var goodputMbps: Double { seconds > 0 ? Double(bytes) * 8 / seconds / 1e6 : 0 }
    var goodputSinceStartMbps: Double { secondsSinceStart > 0 ? Double(bytes) * 8 / secondsSinceStart / 1e6 : 0 }

    func text(json: Bool) -> String {
        if json { return String(decoding: try! Self.encoder.encode(self), as: UTF8.self) }
        var lines = ["\(role) \(localName) <-> \(peerName) [\(verification)]: \(completed ? "completed" : "FAILED: \(error ?? "?")")"]
        lines.append(String(format: "  %d bytes in %.3f s = %.2f Mbit/s, max stall %.1f ms, sha256 %@", bytes, seconds, goodputMbps, maxStallMs, sha256))
        if let sentBytes { lines.append("  sent \(sentBytes) bytes, sha256 \(sentSHA256 ?? "?")") }
        if reinjected > 0 { lines.append("  reinjected \(reinjected) bytes, at most \(subflowsMax) subflows at once") }
        for s in subflows {
            lines.append("  subflow \(s.id) \(s.local.ipAddress ?? "?") -> \(s.remote.ipAddress ?? "?") \(s.interface ?? "-") \(displayState(s.state)) sent \(s.bytesSent) received \(s.bytesReceived) reinjected \(s.reinjectedBytes) rtt \(s.rttMilliseconds.map { String(format: "%.2f ms", $0) } ?? "-")\(s.datagramSize.map { " datagrams \($0) B" } ?? "")\(s.closeReason.map { " (\($0))" } ?? "")")
        }
        return lines.joined(separator: "\n")
    }
}

/// One JSON object per session. Encodable rather than JSONSerialization: with sorted keys, the
/// latter compared keys as NSStrings, and when 10,000 sessions ended at once a serve spent a
/// quarter of its CPU writing their reports while its event loop needed the core.
extension TransferReport: Encodable {
    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return encoder
    }()

    private enum Key: String, CodingKey {
        case role, bytes, sha256, seconds, completed, stalls, subflows, events, error
        case localName = "local_name", peerName = "peer_name", peerVerification = "peer_verification"
        case goodputMbps = "goodput_mbps", secondsSinceStart = "seconds_since_start", goodputSinceStartMbps = "goodput_since_start_mbps"
        case maxStallMs = "max_stall_ms", maxStallAtS = "max_stall_at_s", startedUnix = "started_unix"
        case subflowsMax = "subflows_max", reinjectedBytes = "reinjected_bytes", unlistedStalls = "stalls_unlisted"
        case echoBytes = "echo_bytes", echoSHA256 = "echo_sha256", sentBytes = "sent_bytes", sentSHA256 = "sent_sha256"
    }

    private struct Stall: Encodable {
        let at_s: Double
        let ms: Double
    }

    private struct Event: Encodable {
        let t: Double
        let event: String
    }

    private struct Subflow: Encodable {
        let info: SubflowInfo

        private enum Key: String, CodingKey {
            case local, remote, state, interface
            case bytesSent = "bytes_sent", bytesReceived = "bytes_received", reinjectedBytes = "reinjected_bytes", rttMs = "rtt_ms"
            case datagramSize = "datagram_size"
        }

        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: Key.self)
            try c.encode(info.local.ipAddress ?? "?", forKey: .local)
            try c.encode(info.remote.ipAddress ?? "?", forKey: .remote)
            try c.encode(info.state.rawValue, forKey: .state)
            try c.encode(info.bytesSent, forKey: .bytesSent)
            try c.encode(info.bytesReceived, forKey: .bytesReceived)
            try c.encode(info.reinjectedBytes, forKey: .reinjectedBytes)
            try c.encode(info.rttMilliseconds.map(round3), forKey: .rttMs)  // null when unknown
            try c.encodeIfPresent(info.interface, forKey: .interface)
            try c.encodeIfPresent(info.datagramSize, forKey: .datagramSize)  // UDP subflows only
        }
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        try c.encode(role, forKey: .role)
        try c.encode(localName, forKey: .localName)
        try c.encode(peerName, forKey: .peerName)
        try c.encode(verification, forKey: .peerVerification)
        try c.encode(bytes, forKey: .bytes)
        try c.encode(sha256, forKey: .sha256)
        try c.encode(round3(seconds), forKey: .seconds)
        try c.encode(round3(goodputMbps), forKey: .goodputMbps)
        try c.encode(round3(secondsSinceStart), forKey: .secondsSinceStart)
        try c.encode(round3(goodputSinceStartMbps), forKey: .goodputSinceStartMbps)
        try c.encode(round3(maxStallMs), forKey: .maxStallMs)
        try c.encode(maxStallAt.map(round3), forKey: .maxStallAtS)  // null when there was no gap
        try c.encode(stalls.map { Stall(at_s: round3($0.at), ms: round3($0.ms)) }, forKey: .stalls)
        try c.encode(unlistedStalls, forKey: .unlistedStalls)
        try c.encode(round3(startedUnix), forKey: .startedUnix)
        try c.encode(subflowsMax, forKey: .subflowsMax)
        try c.encode(reinjected, forKey: .reinjectedBytes)
        try c.encode(completed, forKey: .completed)
        try c.encode(subflows.map(Subflow.init), forKey: .subflows)
        try c.encode(events.map { Event(t: round3($0.0), event: $0.1) }, forKey: .events)
        try c.encodeIfPresent(echoBytes, forKey: .echoBytes)
        try c.encodeIfPresent(echoSHA256, forKey: .echoSHA256)
        try c.encodeIfPresent(sentBytes, forKey: .sentBytes)
        try c.encodeIfPresent(sentSHA256, forKey: .sentSHA256)
        try c.encodeIfPresent(error, forKey: .error)
    }
}

func round3(_ x: Double) -> Double { (x * 1000).rounded() / 1000 }

/// A user-facing failure: what happened and what to try. Exit status 1.
struct CLIError: Error, CustomStringConvertible {
    let message: String
    let hint: String?
    init(_ message: String, hint: String? = nil) {
        self.message = message
        self.hint = hint
    }
    var description: String { hint.map { "\(message)\n  hint: \($0)" } ?? message }

    static func fromListen(_ error: NBSError, port: Int) -> CLIError {
        let text = "\(error)"
        if text.contains("in use") {
            return CLIError(text, hint: "another process listens on port \(port) (see `ss -ltnp 'sport = :\(port)'`); pick another --port")
        }
        if text.lowercased().contains("permission") {
            return CLIError(text, hint: "ports below 1024 need root or CAP_NET_BIND_SERVICE; pick a --port above 1023")
        }
        if case .invalidName = error { return CLIError(text, hint: "a name is up to 255 bytes, without spaces or '/'") }
        return CLIError(text)
    }

    static func from(_ error: NBSError, peer: String) -> CLIError {
        switch error {
        case .nameResolutionFailed:
            CLIError("\(error)", hint: "check the name, /etc/hosts (or /etc/netns/NS/hosts inside a namespace) and DNS")
        case .refused(.nameNotServed, _):
            CLIError("\(error)", hint: "the listener on that port serves another name; use the name it serves")
        case .noUsableAddressPairs:
            CLIError("\(error)", hint: "this host has no address of the same family (IPv4/IPv6) as the peer; see `ip addr`")
        case .connectFailed:
            CLIError("\(error)", hint: "is `nbs-mobility serve` (or `cat --listen`) running there, and is the port right?")
        case .invalidName:
            CLIError("\(error)", hint: "a name is up to 255 bytes, without spaces or '/'")
        default:
            CLIError("\(error)")
        }
    }
}
