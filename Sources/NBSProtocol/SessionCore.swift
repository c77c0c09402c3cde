import NIOCore

public enum MultipathPolicy: String, Sendable, CaseIterable, Codable {
    /// All subflows, the lowest-RTT writable one first (MPTCP's default scheduler).
    case aggregate
    /// The primary (first non-backup) subflow only; the others stand by until it fails.
    case handover
    /// The lowest-RTT subflow only, so queues stay short.
    case interactive
}

public enum SessionProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    case dataBeyondWindow(sequence: UInt64, rightEdge: UInt64)
    case dataAfterFin(sequence: UInt64, final: UInt64)
    case ackBeyondSent(ack: UInt64, sent: UInt64)
    case receivedBeyondSent(reported: UInt64, sent: UInt64)
    case conflictingFin(UInt64, UInt64)

    public var description: String {
        switch self {
        case .dataBeyondWindow(let s, let e): "DATA at \(s) beyond the receive window (right edge \(e))"
        case .dataAfterFin(let s, let f): "DATA at \(s) past DATA_FIN at \(f)"
        case .ackBeyondSent(let a, let s): "DATA_ACK \(a) for data never sent (sent up to \(s))"
        case .receivedBeyondSent(let r, let s): "DATA_ACK reports \(r) bytes received on its subflow, where \(s) were sent"
        case .conflictingFin(let a, let b): "DATA_FIN moved from \(a) to \(b)"
        }
    }
}

/// The data plane of one session as a value type: send buffer, reassembly, scheduler, data-level
/// acknowledgements and DATA_FIN. It performs no I/O. The engine feeds it frames and subflow state
/// changes and pulls `nextTransmission()` until it returns nil.
public struct SessionCore: Sendable {
    public struct Configuration: Sendable {
        public var policy: MultipathPolicy = .aggregate
        public var maxSegmentSize = 64 * 1024
        public var sendBufferCapacity = 8 * 1024 * 1024
        public var receiveCapacity = 8 * 1024 * 1024
        public init() {}
    }

    public struct SubflowStats: Sendable, Equatable {
        public var bytesSent = 0
        public var bytesReceived = 0
        public var reinjectedBytes = 0
        public var duplicateBytesReceived = 0
        public init() {}
    }

    struct Subflow: Sendable {
        var id: SubflowID
        var backup: Bool
        var writable = true
        var alive = true
        /// Stalled (no TCP progress): carries nothing until it recovers; its data went elsewhere.
        var suspended = false
        /// Being replaced: carries nothing new, and goes once the peer has what it carries
        /// (`drainSubflow`).
        var draining = false
        var smoothedRTT: Double?  // milliseconds
        /// A slow path gets smaller segments, so reinjected data waits behind less of them.
        var segmentLimit: Int?
        /// Subflows of one group share their bottleneck (the same pair of interfaces): under
        /// `aggregate` one of them carries data and the others stand by (see `scheduledSubflow`).
        var pathGroup: String?
        var stats = SubflowStats()
        /// A byte stream (TCP) delivers what was sent on it in order, so the count of DATA payload
        /// bytes received on it tells its sender exactly which of its segments arrived; a UDP
        /// subflow's count would not (datagrams are lost and resent), and it reports none.
        var ordered: Bool
        /// What our last DATA_ACK on this subflow reported of `stats.bytesReceived`.
        var reportedReceived = 0
        var isUsable: Bool { alive && !suspended && !draining }
    }

    public enum Transmission: Sendable, Equatable {
        case data(SubflowID, sequence: UInt64, payload: ByteBuffer, reinjection: Bool)
        case dataAck(SubflowID, Frame.DataAck)
        case dataFin(SubflowID, Frame.DataFin)

        public var subflow: SubflowID {
            switch self {
            case .data(let s, _, _, _), .dataAck(let s, _), .dataFin(let s, _): s
            }
        }
    }

    private enum LocalFin: Sendable, Equatable {
        case open
        case pending
        case sent(SubflowID)
        case acknowledged
    }

    public let configuration: Configuration
    public private(set) var send: SendBuffer
    public private(set) var receive: ReassemblyBuffer
    private var subflows: [SubflowID: Subflow] = [:]
    /// Establishment order; the first non-backup subflow is the primary.
    private var order: [SubflowID] = []
    private var peerWindowEdge: UInt64
    private var localFin = LocalFin.open
    public private(set) var remoteFinalSequence: UInt64?
    private var lastAdvertisedAck: UInt64 = 0
    private var lastAdvertisedEdge: UInt64 = 0
    private var ackOwed = false
    private var lastDataSubflow: SubflowID?
    public private(set) var reinjectedBytes = 0

    public init(configuration: Configuration = .init(), peerInitialWindow: UInt32 = 0) {
        self.configuration = configuration
        self.send = SendBuffer(capacity: configuration.sendBufferCapacity)
        self.receive = ReassemblyBuffer(capacity: configuration.receiveCapacity)
        self.peerWindowEdge = UInt64(peerInitialWindow)
        // The first DATA_ACK announces our receive window; the peer sends nothing before it.
        self.ackOwed = true
    }

    // MARK: subflows

    /// `ordered`: the subflow is a byte stream (TCP), whose received count is reported to the
    /// peer with each DATA_ACK on it (see `Subflow.ordered`); false for a UDP subflow.
    public mutating func addSubflow(_ id: SubflowID, backup: Bool, ordered: Bool = true) {
        precondition(subflows[id] == nil, "subflow \(id) added twice")
        subflows[id] = Subflow(id: id, backup: backup, ordered: ordered)
        order.append(id)
    }

    public mutating func setWritable(_ id: SubflowID, _ writable: Bool) {
        subflows[id]?.writable = writable
    }

    public mutating func setSegmentLimit(_ id: SubflowID, _ bytes: Int?) {
        subflows[id]?.segmentLimit = bytes.map { max(1024, $0) }
    }

    public mutating func setBackup(_ id: SubflowID, _ backup: Bool) {
        subflows[id]?.backup = backup
    }

    /// nil: the subflow shares its path with no other that we know of.
    public mutating func setPathGroup(_ id: SubflowID, _ group: String?) {
        subflows[id]?.pathGroup = group
    }

    public mutating func recordRTT(_ id: SubflowID, milliseconds sample: Double) {
        guard let old = subflows[id]?.smoothedRTT else {
            subflows[id]?.smoothedRTT = sample
            return
        }
        subflows[id]?.smoothedRTT = old * 7 / 8 + sample / 8
    }

    /// The subflow is gone (closed, reset, retired). Its unacknowledged data is queued to go out on
    /// the others at once. Returns the number of bytes queued for reinjection.
    @discardableResult
    public mutating func removeSubflow(_ id: SubflowID) -> Int {
        guard subflows[id]?.alive == true else { return 0 }
        subflows[id]!.alive = false
        let bytes = send.reinject(from: id)
        send.subflowGone(id)
        if localFin == .sent(id) { localFin = .pending }
        if lastDataSubflow == id { lastDataSubflow = nil }
        if receive.nextExpected > 0 || remoteFinalSequence != nil { ackOwed = true }
        return bytes
    }

    public var aliveSubflows: [SubflowID] { order.filter { subflows[$0]!.alive } }
    /// Alive, neither suspended nor draining: the subflows that can carry data now.
    public var usableSubflows: [SubflowID] { order.filter { subflows[$0]!.isUsable } }
    public func isSuspended(_ id: SubflowID) -> Bool { subflows[id]?.suspended ?? false }

    /// The subflow is to be replaced by a better one: it takes no more data, new or reinjected,
    /// and what it carries arrives as sent (`isDrained` says when). Removing it at once would send
    /// all of that again elsewhere, and the receiver waits for those copies: a link's return
    /// replaced two cross pairs with 319 and 262 kB in flight, and gaps of 200-460 ms followed
    /// (BENCHMARKS.md, "Goodput over time through a link failure").
    public mutating func drainSubflow(_ id: SubflowID) {
        guard subflows[id]?.alive == true else { return }
        subflows[id]!.draining = true
    }

    public func isDraining(_ id: SubflowID) -> Bool { subflows[id]?.draining ?? false }

    /// A draining subflow's data has all reached the peer, by the peer's count of what arrived on
    /// it (a TCP subflow), or is acknowledged or queued to go elsewhere.
    public func isDrained(_ id: SubflowID) -> Bool {
        guard let subflow = subflows[id], subflow.draining else { return false }
        if send.inFlightBytes(on: id) == 0 { return true }
        return subflow.ordered && send.peerReceived(on: id) >= send.sentBytes(on: id)
    }

    /// The subflow stopped making progress (a silent path failure, or a long timeout): what it
    /// carries is sent again elsewhere now, as MPTCP reinjects on a subflow RTO, but the subflow
    /// stays open in case it recovers. Returns the bytes queued for reinjection.
    @discardableResult
    public mutating func suspendSubflow(_ id: SubflowID) -> Int {
        guard subflows[id]?.alive == true, subflows[id]?.suspended == false else { return 0 }
        subflows[id]!.suspended = true
        let bytes = send.reinject(from: id)
        if localFin == .sent(id) { localFin = .pending }
        if lastDataSubflow == id { lastDataSubflow = nil }
        // Our acks may have been on the stalled subflow too: repeat them on a live one.
        if receive.nextExpected > 0 || remoteFinalSequence != nil { ackOwed = true }
        return bytes
    }

    /// No acknowledgement for a while, though the peer reported holding the oldest data: it goes
    /// again, for its duplicate to draw a fresh DATA_ACK (`SendBuffer.resendOldestHeld`).
    @discardableResult
    public mutating func resendOldestHeld() -> Int {
        send.resendOldestHeld()
    }

    /// Copies of the head of line went out on `id` (`SendBuffer.headOfLine`), outside the
    /// scheduler: they count where they went, like any segment sent there.
    public mutating func noteCopies(_ bytes: Int, on id: SubflowID) {
        send.noteCopies(bytes, on: id)
        subflows[id]?.stats.bytesSent += bytes
    }

    /// A UDP subflow lost a DATA datagram: its bytes go out again, on whichever subflow the
    /// scheduler picks. Returns the bytes queued.
    @discardableResult
    public mutating func dataLost(sequence: UInt64, length: Int, on id: SubflowID) -> Int {
        send.markLost(sequence: sequence, length: length, on: id)
    }

    public mutating func resumeSubflow(_ id: SubflowID) {
        guard subflows[id]?.alive == true else { return }
        subflows[id]!.suspended = false
    }
    public func stats(_ id: SubflowID) -> SubflowStats? { subflows[id]?.stats }
    public func smoothedRTT(_ id: SubflowID) -> Double? { subflows[id]?.smoothedRTT }
    public func isBackup(_ id: SubflowID) -> Bool { subflows[id]?.backup ?? false }
    /// Usable subflows in `id`'s path group, other than `id`.
    public func siblings(of id: SubflowID) -> [SubflowID] {
        guard let group = subflows[id]?.pathGroup else { return [] }
        return order.filter { $0 != id && subflows[$0]!.isUsable && subflows[$0]!.pathGroup == group }
    }

    /// Usable, but kept from data while a sibling on the same path group carries it.
    public func isStandby(_ id: SubflowID) -> Bool {
        guard configuration.policy == .aggregate, subflows[id]?.pathGroup != nil else { return false }
        let pool = schedulingPool()
        return pool.contains { $0.id == id } && !dataCarriers(in: pool).contains { $0.id == id }
    }

    // MARK: application side

    public var writableSpace: Int { localFin == .open ? send.freeSpace : 0 }

    public mutating func write(_ bytes: ByteBuffer) {
        precondition(localFin == .open, "write after finish")
        send.append(bytes)
    }

    /// The application has nothing more to send: a DATA_FIN follows the data.
    public mutating func finish() {
        if localFin == .open { localFin = .pending }
    }

    /// In-order data as the slices it arrived in (`ReassemblyBuffer.readSegments`).
    public mutating func readSegments(maxBytes: Int = .max) -> [ByteBuffer]? {
        guard let segments = receive.readSegments(maxBytes: maxBytes) else { return nil }
        // Re-open the window once a quarter of it is free again, so a sender blocked on a full
        // window resumes without waiting for new data to trigger an acknowledgement.
        if receive.rightEdge - lastAdvertisedEdge >= UInt64(configuration.receiveCapacity / 4) { ackOwed = true }
        return segments
    }

    public mutating func read(maxBytes: Int = .max) -> ByteBuffer? {
        readSegments(maxBytes: maxBytes).map(ByteBuffer.init(joining:))
    }

    public var readableBytes: Int { receive.readyBytes }
    /// The peer's DATA_FIN has arrived and every byte before it has been read.
    public var isReadFinished: Bool {
        guard let final = remoteFinalSequence else { return false }
        return receive.nextExpected == final && receive.readyBytes == 0
    }
    /// Our DATA_FIN and every byte before it are acknowledged.
    public var isWriteFinished: Bool { localFin == .acknowledged }
    /// Our DATA_FIN, out on `carrier` and unacknowledged, when it is all that is: every byte before
    /// it is acknowledged. The session copies it to other subflows once it is overdue: the carrier
    /// may be dead at the peer while it still looks alive here.
    public var unacknowledgedFin: (carrier: SubflowID, fin: Frame.DataFin)? {
        guard case .sent(let carrier) = localFin, send.bufferedBytes == 0 else { return nil }
        return (carrier, .init(finalSequence: send.end))
    }
    public var isFinished: Bool { isReadFinished && isWriteFinished }
    /// Nothing is left to cross the network: every byte up to the peer's DATA_FIN has arrived and
    /// our DATA_FIN is acknowledged. The subflows can close even if the application has not read
    /// everything yet.
    public var isTransportFinished: Bool {
        guard let final = remoteFinalSequence else { return false }
        return receive.nextExpected == final && isWriteFinished
    }
    public var unacknowledgedBytes: Int { send.bufferedBytes }

    // MARK: frames from the peer

    public enum Outcome: Sendable, Equatable {
        case none
        /// New in-order data is readable.
        case dataReadable
        /// Send space was freed or the peer's window opened.
        case sendProgress
        case peerFinished
    }

    public mutating func receiveData(_ data: Frame.Data, on id: SubflowID) throws(SessionProtocolError) -> Outcome {
        let length = data.payload.readableBytes
        subflows[id]?.stats.bytesReceived += length
        if let final = remoteFinalSequence {
            let (end, overflow) = data.sequence.addingReportingOverflow(UInt64(length))
            if overflow || end > final { throw .dataAfterFin(sequence: data.sequence, final: final) }
        }
        lastDataSubflow = id
        switch receive.insert(sequence: data.sequence, data.payload) {
        case .accepted(let inOrder):
            if receive.nextExpected - lastAdvertisedAck >= UInt64(ackThreshold) { ackOwed = true }
            // Behind a gap the cumulative ack stands still: the count on this subflow tells the
            // sender what not to send again if the subflow goes, or when it copies the head.
            if let subflow = subflows[id], subflow.ordered,
               subflow.stats.bytesReceived - subflow.reportedReceived >= Self.receptionReportInterval { ackOwed = true }
            if let final = remoteFinalSequence, receive.nextExpected == final { ackOwed = true }
            return inOrder > 0 ? .dataReadable : .none
        case .duplicate:
            // A duplicate means the sender is reinjecting: it has likely lost our acks with a
            // subflow, so acknowledge again rather than leave it waiting at its window.
            subflows[id]?.stats.duplicateBytesReceived += length
            ackOwed = true
            return .none
        case .beyondWindow:
            throw .dataBeyondWindow(sequence: data.sequence, rightEdge: receive.rightEdge)
        }
    }

    private var ackThreshold: Int { min(64 * 1024, configuration.receiveCapacity / 8) }
    /// About 13 ms of a 10 Mbit/s path: what a report may lag behind what arrived, besides its trip.
    static let receptionReportInterval = 16 * 1024

    /// End of a read batch on a subflow: acknowledge whatever arrived since the last DATA_ACK.
    public mutating func readBatchComplete() {
        if receive.nextExpected > lastAdvertisedAck { ackOwed = true }
    }

    /// `ack` arrived on subflow `id`; what it reports received there is about that subflow (nil:
    /// unknown, and the report is not used).
    public mutating func receiveAck(_ ack: Frame.DataAck, on id: SubflowID? = nil) throws(SessionProtocolError) -> Outcome {
        // A subflow already gone has had its data sent again; what arrives on it late changes nothing.
        if let received = ack.receivedOnSubflow, let id, let subflow = subflows[id], subflow.ordered, subflow.alive {
            do {
                try send.peerReceived(received, on: id)
            } catch {
                switch error { case .beyondSent(let reported, let sent): throw .receivedBeyondSent(reported: reported, sent: sent) }
            }
        }
        var dataAck = ack.cumulativeAck
        var finAcked = false
        // The DATA_FIN occupies one sequence number after the data; its ack may arrive more than
        // once (on several subflows), or after the subflow that carried it died.
        if localFin != .open, send.nextNew == send.end, dataAck == send.end + 1 {
            finAcked = true
            dataAck = send.end
        }
        let freed: Int
        do {
            freed = try send.acknowledge(upTo: dataAck)
        } catch {
            throw .ackBeyondSent(ack: ack.cumulativeAck, sent: send.nextNew)
        }
        let edge = dataAck + UInt64(ack.window)
        let windowOpened = edge > peerWindowEdge
        if windowOpened { peerWindowEdge = edge }
        if finAcked, localFin != .acknowledged {
            localFin = .acknowledged
            return .sendProgress
        }
        return freed > 0 || windowOpened ? .sendProgress : .none
    }

    /// The peer's authenticated CLOSE: it sends one only once its side is finished, which needs
    /// every byte we sent and our DATA_FIN. Once we sent that DATA_FIN and hold the peer's whole
    /// stream, the CLOSE acknowledges all of it: the DATA_ACKs that did may have been lost, with the
    /// subflow that carried them (found by the soak scenario: listeners waited out their grace
    /// period), or in a datagram that the CLOSE overtook on a UDP subflow (found by the loopback
    /// test that loses every 20th datagram).
    public mutating func receivePeerClose() -> Outcome {
        guard localFin != .open, localFin != .acknowledged, send.nextNew == send.end,
            let final = remoteFinalSequence, receive.nextExpected == final
        else { return .none }
        _ = try? send.acknowledge(upTo: send.end)
        localFin = .acknowledged
        return .sendProgress
    }

    /// The close timed out with one thing missing: the acknowledgement of our DATA_FIN. Every byte
    /// we sent is acknowledged and we hold the peer's whole stream, so nothing was lost either way;
    /// what is missing is the peer's word that it saw our end, which its last DATA_ACK and CLOSE
    /// carried. Both can be lost for good: in the soak, a peer whose every subflow failed just after
    /// it sent them finished its own close on its linger and went, and this side waited for them
    /// until `closeTimeout`. TCP's LAST_ACK ends so too, without an error. Returns whether the
    /// session may end as closed; any other missing piece leaves the timeout a failure.
    public mutating func concludeWithoutFinalAck() -> Bool {
        guard localFin != .open, localFin != .acknowledged, send.bufferedBytes == 0,
              let final = remoteFinalSequence, receive.nextExpected == final
        else { return false }
        localFin = .acknowledged
        return true
    }

    public mutating func receiveFin(_ fin: Frame.DataFin) throws(SessionProtocolError) -> Outcome {
        if let known = remoteFinalSequence {
            guard known == fin.finalSequence else { throw .conflictingFin(known, fin.finalSequence) }
            ackOwed = true  // the peer resends a FIN whose ack it lost with a subflow
            return .none
        }
        // Data already held beyond the FIN (out of order) contradicts it.
        guard fin.finalSequence >= receive.highestReceived, fin.finalSequence <= receive.rightEdge else {
            throw .dataAfterFin(sequence: receive.nextExpected, final: fin.finalSequence)
        }
        remoteFinalSequence = fin.finalSequence
        if receive.nextExpected == fin.finalSequence { ackOwed = true }
        return .peerFinished
    }

    // MARK: what to send next

    /// The next frame to put on the wire, or nil when nothing may be sent now. Acknowledgements
    /// go first, then reinjected data, then new data, then DATA_FIN.
    public mutating func nextTransmission() -> Transmission? {
        if ackOwed, let target = ackSubflow() {
            ackOwed = false
            var cumulative = receive.nextExpected
            if let final = remoteFinalSequence, final == receive.nextExpected { cumulative = final + 1 }
            lastAdvertisedAck = receive.nextExpected
            lastAdvertisedEdge = receive.rightEdge
            var received: UInt64?
            if let subflow = subflows[target], subflow.ordered, subflow.stats.bytesReceived > subflow.reportedReceived {
                received = UInt64(subflow.stats.bytesReceived)
                subflows[target]!.reportedReceived = subflow.stats.bytesReceived
            }
            return .dataAck(target, .init(cumulativeAck: cumulative, window: receive.window, receivedOnSubflow: received))
        }
        let hasData = send.hasReinjectionPending || (send.unsentBytes > 0 && send.nextNew < peerWindowEdge)
        if hasData, let target = scheduledSubflow() {
            let maxLength = min(configuration.maxSegmentSize, subflows[target]!.segmentLimit ?? .max)
            let segment = send.nextTransmission(on: target, maxLength: maxLength, windowEdge: peerWindowEdge)!
            let length = segment.payload.readableBytes
            subflows[target]!.stats.bytesSent += length
            if segment.isReinjection {
                subflows[target]!.stats.reinjectedBytes += length
                reinjectedBytes += length
            }
            return .data(target, sequence: segment.sequence, payload: segment.payload, reinjection: segment.isReinjection)
        }
        if localFin == .pending, send.unsentBytes == 0, !send.hasReinjectionPending, let target = scheduledSubflow() ?? ackSubflow() {
            localFin = .sent(target)
            return .dataFin(target, .init(finalSequence: send.end))
        }
        return nil
    }

    /// Acknowledgements are small and latency-critical: they go on the subflow data last came
    /// from, else on any live one, regardless of writability.
    private func ackSubflow() -> SubflowID? {
        if let last = lastDataSubflow, subflows[last]?.isUsable == true { return last }
        return usableSubflows.first ?? aliveSubflows.first
    }

    /// Usable subflows in establishment order; backups only when no regular subflow is left.
    private func schedulingPool() -> [Subflow] {
        let alive = order.compactMap { subflows[$0] }.filter(\.isUsable)
        let regular = alive.filter { !$0.backup }
        return regular.isEmpty ? alive : regular
    }

    /// One subflow per path group, the oldest: two flows through one bottleneck (an IPv4 and an
    /// IPv6 subflow between the same two interfaces) only compete there, and each one's losses hold
    /// the receiver's head of line. The sibling stands by, warm (probed, established), and takes
    /// over as soon as the carrier is suspended or gone. A carrier that is merely not writable keeps
    /// its sibling idle: the bottleneck they share is what is full.
    private func dataCarriers(in pool: [Subflow]) -> [Subflow] {
        var seen: Set<String> = []
        return pool.filter { subflow in
            guard let group = subflow.pathGroup else { return true }
            return seen.insert(group).inserted
        }
    }

    /// The scheduler's decision for the next data segment, according to the policy.
    func scheduledSubflow() -> SubflowID? {
        let pool = schedulingPool()
        switch configuration.policy {
        case .handover:
            guard let primary = pool.first, primary.writable else { return nil }
            return primary.id
        case .interactive:
            guard let fastest = pool.min(by: Self.fasterFirst), fastest.writable else { return nil }
            return fastest.id
        case .aggregate:
            // A subflow much slower than the fastest holds the receiver's head of line for longer
            // than waiting for the fast one would (the idea of the ECF/BLEST schedulers): data
            // waits for the fast subflows rather than go there.
            let carriers = dataCarriers(in: pool)
            let fastest = carriers.compactMap(\.smoothedRTT).min()
            let notFarSlower = { (subflow: Subflow) -> Bool in
                guard let fastest, let rtt = subflow.smoothedRTT else { return true }
                return rtt <= Self.slowFactor * fastest + Self.slowMarginMs
            }
            // Reinjected data fills the receiver's hole. A standby sibling on a surviving path has
            // nothing queued: the first of it enters the bottleneck now, not behind a carrier's
            // queue. Only the first: the rest would share that bottleneck with the carrier's new
            // data (a 10 Mbit/s path then took 390 ms for 310 kB), where behind the carrier's
            // queue it goes ahead of all new data, and that queue has drained by then.
            if send.hasReinjectionPending {
                let carrierIDs = Set(carriers.map(\.id))
                let allowance = Self.standbyReinjectionSegments * (carriers.compactMap(\.segmentLimit).max() ?? configuration.maxSegmentSize)
                let standby = pool.filter {
                    $0.writable && !carrierIDs.contains($0.id) && notFarSlower($0) && send.inFlightBytes(on: $0.id) < allowance
                }
                if let target = standby.min(by: Self.fasterFirst) { return target.id }
            }
            return carriers.filter(notFarSlower).filter(\.writable).min(by: Self.fasterFirst)?.id
        }
    }

    /// What a standby takes of a reinjection, in the carrier's segments: about the carrier's queue
    /// (`SessionEngine.segmentsPerQueue` segments) and as much again for its window.
    static let standbyReinjectionSegments = 8

    static let slowFactor = 4.0
    static let slowMarginMs = 20.0

    /// Unmeasured subflows sort after measured ones; ties keep establishment order (min is stable).
    private static func fasterFirst(_ a: Subflow, _ b: Subflow) -> Bool {
        switch (a.smoothedRTT, b.smoothedRTT) {
        case let (x?, y?): x < y
        case (_?, nil): true
        default: false
        }
    }
}
