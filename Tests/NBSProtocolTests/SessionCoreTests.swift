import NIOCore
import Testing

@testable import NBSProtocol

private let a = SubflowID(1)
private let b = SubflowID(2)
private let c = SubflowID(3)
private let d = SubflowID(4)
private let e = SubflowID(5)

func coreConfiguration(policy: MultipathPolicy = .aggregate, segment: Int = 32 * 1024, send: Int = 1 << 20, receive: Int = 1 << 20) -> SessionCore.Configuration {
    var configuration = SessionCore.Configuration()
    configuration.policy = policy
    configuration.maxSegmentSize = segment
    configuration.sendBufferCapacity = send
    configuration.receiveCapacity = receive
    return configuration
}

extension SessionCore {
    mutating func drain() -> [Transmission] {
        var out: [Transmission] = []
        while let t = nextTransmission() {
            out.append(t)
            if out.count > 100_000 {
                Issue.record("nextTransmission never returns nil")
                break
            }
        }
        return out
    }

    /// Applies a transmission of the peer as if it arrived on the same subflow here.
    @discardableResult
    mutating func apply(_ t: Transmission) throws(SessionProtocolError) -> Outcome {
        switch t {
        case .data(let id, let sequence, let payload, _): try receiveData(.init(sequence: sequence, payload: payload), on: id)
        case .dataAck(let id, let ack): try receiveAck(ack, on: id)
        case .dataFin(_, let fin): try receiveFin(fin)
        }
    }

    mutating func readAll() -> [UInt8] {
        var out: [UInt8] = []
        while let b = read() { out += bytes(of: b) }
        return out
    }
}

extension SessionCore.Transmission {
    var dataRange: Range<UInt64>? {
        guard case .data(_, let sequence, let payload, _) = self else { return nil }
        return sequence..<sequence + UInt64(payload.readableBytes)
    }
    var isReinjection: Bool {
        guard case .data(_, _, _, let reinjection) = self else { return false }
        return reinjection
    }
}

/// A core with its subflows added and its first transmission, the DATA_ACK that announces its
/// receive window, already taken (and checked).
func makeCore(_ configuration: SessionCore.Configuration = .init(), peerWindow: UInt32, subflows: [(SubflowID, Bool)],
              sourceLocation: SourceLocation = #_sourceLocation) -> SessionCore {
    var core = SessionCore(configuration: configuration, peerInitialWindow: peerWindow)
    for (id, backup) in subflows { core.addSubflow(id, backup: backup) }
    let announcement = core.drain()
    #expect(announcement == [.dataAck(subflows[0].0, .init(cumulativeAck: 0, window: UInt32(configuration.receiveCapacity)))],
            sourceLocation: sourceLocation)
    return core
}

/// Moves everything each side has to send to the other until both are quiet.
func exchange(_ x: inout SessionCore, _ y: inout SessionCore, readBoth: Bool = true) throws {
    for _ in 0..<10_000 {
        let fromX = x.drain()
        let fromY = y.drain()
        if fromX.isEmpty && fromY.isEmpty { return }
        for t in fromX { try y.apply(t) }
        for t in fromY { try x.apply(t) }
        y.readBatchComplete()
        x.readBatchComplete()
    }
    Issue.record("the two cores never went quiet")
}

@Suite("Session core")
struct SessionCoreTests {
    // MARK: flow control

    @Test("data never goes beyond the peer's window edge")
    func windowRespected() throws {
        var core = makeCore(coreConfiguration(segment: 100), peerWindow: 250, subflows: [(a, false)])
        core.write(buffer(patternBytes(1000, seed: 1)))
        #expect(core.drain().compactMap(\.dataRange) == [0..<100, 100..<200, 200..<250])

        #expect(try core.receiveAck(.init(cumulativeAck: 100, window: 250)) == .sendProgress)
        #expect(core.drain().compactMap(\.dataRange) == [250..<350])
        // A stale ack with a smaller window does not pull the edge back, nor push it.
        #expect(try core.receiveAck(.init(cumulativeAck: 50, window: 10)) == .none)
        #expect(core.drain().isEmpty)
        // Everything acknowledged, window closed.
        #expect(try core.receiveAck(.init(cumulativeAck: 350, window: 0)) == .sendProgress)
        #expect(core.drain().isEmpty)
        #expect(try core.receiveAck(.init(cumulativeAck: 350, window: 0)) == .none)
        #expect(try core.receiveAck(.init(cumulativeAck: 350, window: 1000)) == .sendProgress)
        let rest = core.drain().compactMap(\.dataRange)
        #expect(rest.first?.lowerBound == 350)
        #expect(rest.last?.upperBound == 1000)
    }

    @Test("with no window nothing is sent, not even the DATA_FIN that must follow the data")
    func zeroWindow() {
        var core = makeCore(coreConfiguration(), peerWindow: 0, subflows: [(a, false)])
        core.write(buffer([1, 2, 3]))
        core.finish()
        #expect(core.drain().isEmpty)
    }

    @Test("random acks and windows: every segment stays below the largest advertised edge", arguments: [UInt64(1), 2, 3])
    func windowProperty(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        let initial = UInt32.random(in: 0...5000, using: &rng)
        var core = makeCore(coreConfiguration(segment: 700, send: 1 << 20), peerWindow: initial, subflows: [(a, false), (b, false), (c, false)])
        core.write(buffer(patternBytes(200_000, seed: seed)))
        var edge = UInt64(initial)
        var sent: UInt64 = 0
        var acked: UInt64 = 0
        for _ in 0..<3000 {
            if rng.chance(0.5) {
                acked = UInt64.random(in: acked...sent, using: &rng)
                let window = UInt32.random(in: 0...20_000, using: &rng)
                let stale = rng.chance(0.2) ? UInt64.random(in: 0...acked, using: &rng) : acked
                _ = try core.receiveAck(.init(cumulativeAck: stale, window: window))
                edge = max(edge, stale + UInt64(window))
            }
            if rng.chance(0.2) { core.setWritable([a, b, c].randomElement(using: &rng)!, rng.chance(0.7)) }
            for t in core.drain() {
                guard let range = t.dataRange else { continue }
                #expect(range.upperBound <= edge)
                #expect(range.lowerBound == sent)
                sent = range.upperBound
            }
        }
        #expect(sent > 0)
    }

    @Test("writable space follows the send buffer and closes at finish")
    func writableSpace() throws {
        var core = makeCore(coreConfiguration(send: 1000), peerWindow: 10_000, subflows: [(a, false)])
        #expect(core.writableSpace == 1000)
        core.write(buffer(patternBytes(600, seed: 2)))
        #expect(core.writableSpace == 400)
        #expect(core.unacknowledgedBytes == 600)
        _ = core.drain()
        _ = try core.receiveAck(.init(cumulativeAck: 500, window: 10_000))
        #expect(core.writableSpace == 900)
        #expect(core.unacknowledgedBytes == 100)
        core.finish()
        #expect(core.writableSpace == 0)
    }

    // MARK: scheduling policies

    @Test("aggregate: the lowest-RTT writable regular subflow")
    func aggregate() {
        var core = makeCore(coreConfiguration(policy: .aggregate), peerWindow: .max, subflows: [(a, false), (b, false), (c, false), (d, true)])
        // Unmeasured subflows keep establishment order.
        #expect(core.scheduledSubflow() == a)
        core.recordRTT(a, milliseconds: 30)
        core.recordRTT(b, milliseconds: 10)
        core.recordRTT(c, milliseconds: 20)
        core.recordRTT(d, milliseconds: 1)
        #expect(core.scheduledSubflow() == b)
        core.setWritable(b, false)
        #expect(core.scheduledSubflow() == c)
        core.setWritable(c, false)
        #expect(core.scheduledSubflow() == a)
        core.setWritable(a, false)
        // The writable backup is not used while regular subflows are alive.
        #expect(core.scheduledSubflow() == nil)
        core.setWritable(c, true)
        #expect(core.scheduledSubflow() == c)

        // An unmeasured subflow comes after measured ones.
        core.addSubflow(e, backup: false)
        #expect(core.scheduledSubflow() == c)
        core.setWritable(c, false)
        #expect(core.scheduledSubflow() == e)

        // The data itself goes where the scheduler says.
        core.write(buffer(patternBytes(10, seed: 3)))
        #expect(core.drain().map(\.subflow) == [e])
    }

    @Test("aggregate spreads data as writability changes")
    func aggregateSpreads() {
        var core = makeCore(coreConfiguration(policy: .aggregate, segment: 100), peerWindow: .max, subflows: [(a, false), (b, false)])
        core.recordRTT(a, milliseconds: 5)
        core.recordRTT(b, milliseconds: 30)
        core.write(buffer(patternBytes(1000, seed: 4)))
        #expect(core.nextTransmission()?.subflow == a)
        core.setWritable(a, false)
        #expect(core.nextTransmission()?.subflow == b)
        #expect(core.nextTransmission()?.subflow == b)
        core.setWritable(a, true)
        #expect(core.nextTransmission()?.subflow == a)
        #expect(core.stats(a)?.bytesSent == 200)
        #expect(core.stats(b)?.bytesSent == 200)
    }

    @Test("aggregate keeps data off a subflow far slower than the fastest, and uses it when alone")
    func aggregateSkipsFarSlower() {
        var core = makeCore(coreConfiguration(policy: .aggregate, segment: 100), peerWindow: .max, subflows: [(a, false), (b, false)])
        core.recordRTT(a, milliseconds: 20)
        core.recordRTT(b, milliseconds: 900)
        core.write(buffer(patternBytes(1000, seed: 5)))
        core.setWritable(a, false)
        #expect(core.nextTransmission() == nil)
        core.setWritable(a, true)
        #expect(core.nextTransmission()?.subflow == a)
        core.removeSubflow(a)
        #expect(core.nextTransmission()?.subflow == b)
    }

    @Test("aggregate: one subflow per path group carries data, its sibling stands by and takes over when it stalls or goes")
    func siblingsStandBy() {
        var core = makeCore(coreConfiguration(policy: .aggregate, segment: 100), peerWindow: .max, subflows: [(a, false), (b, false), (c, false)])
        // a and b: IPv4 and IPv6 over one pair of interfaces; c: the other path, slower.
        core.setPathGroup(a, "nbs1 > peer interface 1")
        core.setPathGroup(b, "nbs1 > peer interface 1")
        core.setPathGroup(c, "nbs2 > peer interface 2")
        core.recordRTT(a, milliseconds: 12)
        core.recordRTT(b, milliseconds: 5)
        core.recordRTT(c, milliseconds: 30)
        #expect(!core.isStandby(a) && core.isStandby(b) && !core.isStandby(c))
        #expect(core.siblings(of: a) == [b] && core.siblings(of: b) == [a] && core.siblings(of: c).isEmpty)
        core.write(buffer(patternBytes(1000, seed: 6)))
        // b is faster but stands by: the oldest of a group carries, whatever the RTTs say.
        #expect(core.nextTransmission()?.subflow == a)
        // a's bottleneck is full: the data goes to the other path, not to a's sibling.
        core.setWritable(a, false)
        #expect(core.nextTransmission()?.subflow == c)
        core.setWritable(c, false)
        #expect(core.nextTransmission() == nil)
        core.setWritable(a, true)
        core.setWritable(c, true)
        // a stalls: its data is reinjected, and b takes over at once.
        core.suspendSubflow(a)
        #expect(!core.isStandby(b))
        #expect(core.nextTransmission()?.subflow == b)
        core.resumeSubflow(a)
        #expect(core.isStandby(b))
        #expect(core.nextTransmission()?.subflow == a)
        core.removeSubflow(a)
        #expect(!core.isStandby(b))
        #expect(core.nextTransmission()?.subflow == b)
        #expect(core.stats(b)!.bytesSent > 0)
    }

    @Test("aggregate: reinjected data goes first to a standby sibling on a surviving path, whose queue is empty, then to the carriers")
    func reinjectionPrefersAnIdleStandby() {
        var core = makeCore(coreConfiguration(policy: .aggregate, segment: 100), peerWindow: .max, subflows: [(a, false), (b, false), (c, false), (d, false)])
        // a, b on path 1 (a carries); c, d on path 2 (c carries). Path 1 goes down.
        core.setPathGroup(a, "nbs1 > peer interface 1")
        core.setPathGroup(b, "nbs1 > peer interface 1")
        core.setPathGroup(c, "nbs2 > peer interface 2")
        core.setPathGroup(d, "nbs2 > peer interface 2")
        for id in [a, b, c, d] { core.recordRTT(id, milliseconds: 20) }
        core.write(buffer(patternBytes(1000, seed: 8)))
        core.setWritable(c, false)
        #expect(core.drain().filter { $0.dataRange != nil }.map(\.subflow) == Array(repeating: a, count: 10))
        core.removeSubflow(b)
        #expect(core.removeSubflow(a) == 1000)
        // c, the carrier, is full; d stands by with nothing queued and takes the first of the
        // reinjection: up to 8 of the carrier's segments (here the configured 100 bytes).
        #expect(core.isStandby(d))
        let onStandby = core.drain()
        #expect(onStandby.map(\.subflow) == Array(repeating: d, count: 8))
        #expect(onStandby.allSatisfy { $0.isReinjection })
        #expect(onStandby.first?.dataRange == 0..<100)
        // The rest waits for the carrier, ahead of any new data; new data never goes to the standby.
        core.write(buffer(patternBytes(100, seed: 9)))
        #expect(core.nextTransmission() == nil)
        core.setWritable(c, true)
        let rest = core.drain()
        #expect(rest.map(\.subflow) == [c, c, c])
        #expect(rest.map(\.isReinjection) == [true, true, false])
        #expect(rest.map(\.dataRange) == [800..<900, 900..<1000, 1000..<1100])
    }

    @Test("subflows without a path group, and every policy but aggregate, ignore grouping", arguments: MultipathPolicy.allCases)
    func groupingOnlyUnderAggregate(policy: MultipathPolicy) {
        var core = makeCore(coreConfiguration(policy: policy, segment: 100), peerWindow: .max, subflows: [(a, false), (b, false), (c, false)])
        core.setPathGroup(b, "lo > peer interface 1")
        core.setPathGroup(c, "lo > peer interface 1")
        core.recordRTT(a, milliseconds: 20)
        core.recordRTT(b, milliseconds: 10)
        core.recordRTT(c, milliseconds: 5)
        core.write(buffer(patternBytes(1000, seed: 7)))
        #expect(!core.isStandby(a) && !core.isStandby(b))
        #expect(core.isStandby(c) == (policy == .aggregate))
        let expected: SubflowID = switch policy {
        case .aggregate: b  // c stands by for b, so b is the fastest carrier
        case .interactive: c
        case .handover: a
        }
        #expect(core.nextTransmission()?.subflow == expected)
    }

    @Test("RTT samples are smoothed")
    func smoothing() {
        var core = makeCore(peerWindow: 0, subflows: [(a, false)])
        #expect(core.smoothedRTT(a) == nil)
        core.recordRTT(a, milliseconds: 100)
        #expect(core.smoothedRTT(a) == 100)
        core.recordRTT(a, milliseconds: 20)
        #expect(core.smoothedRTT(a) == 90)
        core.recordRTT(SubflowID(99), milliseconds: 1)  // unknown: ignored
        #expect(core.smoothedRTT(SubflowID(99)) == nil)
    }

    @Test("handover: the primary only, then the next one when it goes")
    func handover() {
        var core = makeCore(coreConfiguration(policy: .handover), peerWindow: .max, subflows: [(a, true), (b, false), (c, false)])
        core.recordRTT(b, milliseconds: 50)
        core.recordRTT(c, milliseconds: 1)
        // The first regular subflow is the primary, however slow.
        #expect(core.scheduledSubflow() == b)
        core.write(buffer(patternBytes(10, seed: 5)))
        #expect(core.drain().map(\.subflow) == [b])
        // A blocked primary blocks the session; the standby is not used.
        core.setWritable(b, false)
        #expect(core.scheduledSubflow() == nil)
        // The primary goes: its data moves to the next regular subflow.
        #expect(core.removeSubflow(b) == 10)
        #expect(core.scheduledSubflow() == c)
        let moved = core.drain()
        #expect(moved.map(\.subflow) == [c])
        #expect(moved.first?.isReinjection == true)
        #expect(moved.first?.dataRange == 0..<10)
        // Then only the backup is left.
        core.removeSubflow(c)
        #expect(core.scheduledSubflow() == a)
        #expect(core.aliveSubflows == [a])
    }

    @Test("handover: a PRIO change moves the primary")
    func handoverPriority() {
        var core = makeCore(coreConfiguration(policy: .handover), peerWindow: .max, subflows: [(a, false), (b, false)])
        #expect(core.scheduledSubflow() == a)
        core.setBackup(a, true)
        #expect(core.isBackup(a))
        #expect(core.scheduledSubflow() == b)
        core.setBackup(a, false)
        #expect(core.scheduledSubflow() == a)
    }

    @Test("interactive: sticks to the lowest RTT, even while it is blocked")
    func interactive() {
        var core = makeCore(coreConfiguration(policy: .interactive), peerWindow: .max, subflows: [(a, false), (b, false), (c, true)])
        core.recordRTT(a, milliseconds: 30)
        core.recordRTT(b, milliseconds: 10)
        core.recordRTT(c, milliseconds: 1)
        #expect(core.scheduledSubflow() == b)
        core.setWritable(b, false)
        #expect(core.scheduledSubflow() == nil)
        core.setWritable(b, true)
        // RTTs change: so does the choice.
        for _ in 0..<40 { core.recordRTT(b, milliseconds: 100) }
        #expect(core.scheduledSubflow() == a)
        core.removeSubflow(a)
        core.removeSubflow(b)
        #expect(core.scheduledSubflow() == c)
    }

    @Test("backups carry data only when no regular subflow is alive", arguments: MultipathPolicy.allCases)
    func backupsLast(policy: MultipathPolicy) {
        var core = makeCore(coreConfiguration(policy: policy), peerWindow: .max, subflows: [(a, true), (b, false)])
        core.recordRTT(a, milliseconds: 1)
        core.recordRTT(b, milliseconds: 100)
        #expect(core.scheduledSubflow() == b)
        core.setWritable(b, false)
        #expect(core.scheduledSubflow() == nil)
        core.write(buffer([1, 2, 3]))
        #expect(core.drain().isEmpty)
        core.removeSubflow(b)
        #expect(core.scheduledSubflow() == a)
        #expect(core.drain().map(\.subflow) == [a])
        core.removeSubflow(a)
        #expect(core.scheduledSubflow() == nil)
        #expect(core.aliveSubflows.isEmpty)
    }

    // MARK: DATA_FIN

    @Test("DATA_FIN follows all data and is acknowledged with finalSequence + 1")
    func dataFin() throws {
        var core = makeCore(coreConfiguration(segment: 60), peerWindow: 1000, subflows: [(a, false)])
        core.write(buffer(patternBytes(100, seed: 6)))
        core.finish()
        core.finish()  // idempotent
        let sent = core.drain()
        #expect(sent.count == 3)
        #expect(sent.prefix(2).compactMap(\.dataRange) == [0..<60, 60..<100])
        #expect(sent.last == .dataFin(a, .init(finalSequence: 100)))
        #expect(core.drain().isEmpty)
        #expect(!core.isWriteFinished)
        #expect(try core.receiveAck(.init(cumulativeAck: 100, window: 1000)) == .sendProgress)
        #expect(!core.isWriteFinished)
        #expect(try core.receiveAck(.init(cumulativeAck: 101, window: 1000)) == .sendProgress)
        #expect(core.isWriteFinished)
        #expect(core.unacknowledgedBytes == 0)
        #expect(try core.receiveAck(.init(cumulativeAck: 101, window: 1000)) == .none)  // on another subflow
        #expect(core.isWriteFinished)
        #expect(!core.isFinished)  // the peer has not finished
    }

    @Test("an empty stream is just a DATA_FIN at 0")
    func emptyStream() throws {
        var core = makeCore(peerWindow: 0, subflows: [(a, false)])
        core.finish()
        #expect(core.drain() == [.dataFin(a, .init(finalSequence: 0))])
        _ = try core.receiveAck(.init(cumulativeAck: 1, window: 0))
        #expect(core.isWriteFinished)
    }

    @Test("the peer's DATA_FIN is acknowledged once all data arrived; finished once read")
    func peerFin() throws {
        var core = makeCore(coreConfiguration(receive: 1000), peerWindow: 0, subflows: [(a, false), (b, false)])
        let stream = patternBytes(50, seed: 7)
        // FIN first, then the data out of order on two subflows.
        #expect(try core.receiveFin(.init(finalSequence: 50)) == .peerFinished)
        #expect(core.remoteFinalSequence == 50)
        #expect(try core.receiveData(.init(sequence: 20, payload: buffer(Array(stream[20..<50]))), on: b) == .none)
        #expect(core.drain().isEmpty)  // nothing in order yet, nothing to acknowledge
        #expect(try core.receiveData(.init(sequence: 0, payload: buffer(Array(stream[0..<20]))), on: a) == .dataReadable)
        #expect(!core.isReadFinished)  // not read yet
        let acks = core.drain()
        #expect(acks == [.dataAck(a, .init(cumulativeAck: 51, window: 950, receivedOnSubflow: 20))])
        #expect(core.readAll() == stream)
        #expect(core.isReadFinished)
        // Our side: an empty stream.
        core.finish()
        let fin = core.drain().filter { if case .dataFin = $0 { true } else { false } }
        #expect(fin.count == 1)
        _ = try core.receiveAck(.init(cumulativeAck: 1, window: 1000))
        #expect(core.isFinished)
    }

    @Test("a repeated DATA_FIN is acknowledged again")
    func repeatedFin() throws {
        var core = makeCore(peerWindow: 0, subflows: [(a, false)])
        _ = try core.receiveData(.init(sequence: 0, payload: buffer([1, 2])), on: a)
        _ = try core.receiveFin(.init(finalSequence: 2))
        #expect(core.drain().map(\.subflow) == [a])
        #expect(try core.receiveFin(.init(finalSequence: 2)) == .none)
        #expect(core.drain().count == 1)
    }

    @Test("a DATA_FIN whose subflow dies before its ack is sent again")
    func finResent() throws {
        var core = makeCore(peerWindow: 1000, subflows: [(a, false), (b, false)])
        core.write(buffer(patternBytes(10, seed: 8)))
        core.finish()
        let first = core.drain()
        #expect(first.compactMap(\.dataRange) == [0..<10])
        #expect(first.last == .dataFin(a, .init(finalSequence: 10)))
        // Another subflow dying changes nothing.
        core.addSubflow(c, backup: true)
        core.removeSubflow(c)
        #expect(core.drain().isEmpty)
        // The FIN's subflow dies: the data goes again first, then the FIN, on the survivor.
        #expect(core.removeSubflow(a) == 10)
        let again = core.drain()
        #expect(again.count == 2)
        #expect(again.first?.isReinjection == true)
        #expect(again.first?.subflow == b)
        #expect(again.last == .dataFin(b, .init(finalSequence: 10)))
        _ = try core.receiveAck(.init(cumulativeAck: 11, window: 1000))
        #expect(core.isWriteFinished)
        // Once acknowledged, losing the subflow does not send it again.
        core.removeSubflow(b)
        #expect(core.drain().isEmpty)
    }

    @Test("the ack of a FIN whose subflow died is still accepted")
    func finAckAfterSubflowDied() throws {
        var core = makeCore(peerWindow: 1000, subflows: [(a, false), (b, false)])
        core.finish()
        #expect(core.drain() == [.dataFin(a, .init(finalSequence: 0))])
        core.removeSubflow(a)
        #expect(try core.receiveAck(.init(cumulativeAck: 1, window: 1000)) == .sendProgress)
        #expect(core.isWriteFinished)
        #expect(core.drain().isEmpty)
    }

    @Test("a draining subflow takes nothing more and is drained once the peer has what it carried")
    func drainingSubflow() throws {
        var core = makeCore(coreConfiguration(segment: 100), peerWindow: 10_000, subflows: [(a, false), (b, false)])
        core.setWritable(b, false)
        core.write(buffer(patternBytes(300, seed: 3)))
        #expect(core.drain().map(\.subflow) == [a, a, a])
        core.drainSubflow(a)
        #expect(core.isDraining(a) && !core.isDrained(a))
        #expect(core.usableSubflows == [b])

        // New data waits for b, never a, even with a writable and b not.
        core.write(buffer(patternBytes(200, seed: 4)))
        #expect(core.drain().isEmpty)
        core.setWritable(b, true)
        let next = core.drain()
        #expect(next.map(\.subflow) == [b, b] && !next.contains { $0.isReinjection })

        // The peer's count on a, not the cumulative ack (held up by a gap elsewhere), says when.
        _ = try core.receiveAck(.init(cumulativeAck: 0, window: 10_000, receivedOnSubflow: 200), on: a)
        #expect(!core.isDrained(a))
        _ = try core.receiveAck(.init(cumulativeAck: 0, window: 10_000, receivedOnSubflow: 300), on: a)
        #expect(core.isDrained(a))
        #expect(!core.isDrained(b), "only a draining subflow is ever drained")

        // A subflow that reports no count (UDP) is drained once its data is acknowledged.
        var datagrams = SessionCore(configuration: coreConfiguration(segment: 100), peerInitialWindow: 10_000)
        datagrams.addSubflow(a, backup: false, ordered: false)
        datagrams.addSubflow(b, backup: false, ordered: false)
        _ = datagrams.drain()
        datagrams.setWritable(b, false)
        datagrams.write(buffer(patternBytes(200, seed: 5)))
        #expect(datagrams.drain().map(\.subflow) == [a, a])
        datagrams.drainSubflow(a)
        _ = try datagrams.receiveAck(.init(cumulativeAck: 100, window: 10_000), on: b)
        #expect(!datagrams.isDrained(a))
        _ = try datagrams.receiveAck(.init(cumulativeAck: 200, window: 10_000), on: b)
        #expect(datagrams.isDrained(a))
    }

    // MARK: acknowledgements

    @Test("acks: after a threshold, at the end of a read batch, on the data's subflow, and when reading reopens the window")
    func acks() throws {
        var core = makeCore(coreConfiguration(receive: 1000), peerWindow: 0, subflows: [(a, false), (b, false)])  // ack threshold 125
        let stream = patternBytes(1000, seed: 9)
        #expect(try core.receiveData(.init(sequence: 0, payload: buffer(Array(stream[0..<100]))), on: a) == .dataReadable)
        #expect(core.drain().isEmpty)
        core.readBatchComplete()
        #expect(core.drain() == [.dataAck(a, .init(cumulativeAck: 100, window: 900, receivedOnSubflow: 100))])
        core.readBatchComplete()
        #expect(core.drain().isEmpty)

        core.setWritable(b, false)  // acks ignore writability
        _ = try core.receiveData(.init(sequence: 100, payload: buffer(Array(stream[100..<300]))), on: b)
        #expect(core.drain() == [.dataAck(b, .init(cumulativeAck: 300, window: 700, receivedOnSubflow: 200))])

        // Reading less than a quarter of the capacity does not send a window update; more does.
        #expect(core.read(maxBytes: 200).map(bytes(of:)) == Array(stream[0..<200]))
        #expect(core.drain().isEmpty)
        #expect(core.read(maxBytes: 100).map(bytes(of:)) == Array(stream[200..<300]))
        #expect(core.drain() == [.dataAck(b, .init(cumulativeAck: 300, window: 1000))], "b's count was reported already")
        #expect(core.stats(a)?.bytesReceived == 100)
        #expect(core.stats(b)?.bytesReceived == 200)
    }

    @Test("acks go before data")
    func acksFirst() throws {
        var core = makeCore(peerWindow: 1000, subflows: [(a, false)])
        core.write(buffer([1, 2, 3]))
        _ = try core.receiveData(.init(sequence: 0, payload: buffer([9])), on: a)
        core.readBatchComplete()
        let sent = core.drain()
        #expect(sent.count == 2)
        #expect(sent.first == .dataAck(a, .init(cumulativeAck: 1, window: UInt32(SessionCore.Configuration().receiveCapacity - 1), receivedOnSubflow: 1)))
    }

    @Test("losing a subflow re-sends the acknowledgement on another one")
    func reAckAfterLoss() throws {
        var core = makeCore(peerWindow: 0, subflows: [(a, false), (b, false)])
        _ = try core.receiveData(.init(sequence: 0, payload: buffer([1, 2, 3])), on: a)
        core.readBatchComplete()
        #expect(core.drain().map(\.subflow) == [a])
        core.removeSubflow(a)
        let again = core.drain()
        #expect(again.count == 1)
        #expect(again.first?.subflow == b)
        #expect(core.removeSubflow(a) == 0)  // already gone
        #expect(core.removeSubflow(SubflowID(77)) == 0)  // never existed
    }

    @Test("duplicates and reinjections are counted")
    func statistics() throws {
        var sender = makeCore(coreConfiguration(segment: 100), peerWindow: 10_000, subflows: [(a, false), (b, false)])
        var receiver = makeCore(peerWindow: 0, subflows: [(a, false), (b, false)])
        sender.write(buffer(patternBytes(300, seed: 10)))
        let sent = sender.drain()
        #expect(sent.allSatisfy { $0.subflow == a })
        // All of it arrives, but its acknowledgements are lost with subflow a.
        for t in sent { try receiver.apply(t) }
        #expect(sender.removeSubflow(a) == 300)
        let again = sender.drain()
        #expect(again.allSatisfy { $0.subflow == b && $0.isReinjection })
        for t in again { try receiver.apply(t) }
        #expect(sender.reinjectedBytes == 300)
        #expect(sender.stats(b)?.reinjectedBytes == 300)
        #expect(sender.stats(a)?.bytesSent == 300)
        #expect(sender.stats(b)?.bytesSent == 300)
        #expect(receiver.stats(b)?.duplicateBytesReceived == 300)
        #expect(receiver.receive.duplicateBytes == 300)
        #expect(receiver.readAll() == patternBytes(300, seed: 10))
    }

    @Test("what arrived beyond a gap is reported per TCP subflow, and not sent again when that subflow goes")
    func receivedBeyondAGap() throws {
        var sender = makeCore(coreConfiguration(segment: 1000), peerWindow: 1 << 20, subflows: [(a, false), (b, false)])
        var receiver = makeCore(peerWindow: 0, subflows: [(a, false), (b, false)])
        // b carries the first 5,000 bytes, a the next 40,000 (the engine marks a subflow unwritable
        // when its queue is full).
        sender.setWritable(a, false)
        sender.write(buffer(patternBytes(5_000, seed: 11)))
        var sent = sender.drain()
        sender.setWritable(b, false)
        sender.setWritable(a, true)
        sender.write(buffer(patternBytes(40_000, seed: 12)))
        sent += sender.drain()
        let onA = sent.filter { $0.subflow == a }.compactMap(\.dataRange).reduce(0) { $0 + $1.count }
        let onB = sent.filter { $0.subflow == b }.compactMap(\.dataRange).reduce(0) { $0 + $1.count }
        try #require(onA == 40_000 && onB == 5_000, "\(onA) on a, \(onB) on b")
        // b's segments are lost: everything a brings lies beyond a gap, and the cumulative ack stays at 0.
        var acks: [SessionCore.Transmission] = []
        for t in sent where t.subflow == a {
            try receiver.apply(t)
            acks += receiver.drain()
        }
        #expect(!acks.isEmpty, "reports every \(SessionCore.receptionReportInterval) bytes, with no read batch ending")
        #expect(acks.allSatisfy { if case .dataAck(a, let ack) = $0 { ack.cumulativeAck == 0 } else { false } })
        guard case .dataAck(_, let last) = acks.last else { return }
        let reported = try #require(last.receivedOnSubflow)
        #expect(reported > UInt64(onA - SessionCore.receptionReportInterval) && reported <= UInt64(onA))
        for t in acks { try sender.apply(t) }
        // A report of more than was sent there is a protocol violation.
        #expect(throws: SessionProtocolError.receivedBeyondSent(reported: UInt64(onA) + 1, sent: UInt64(onA))) {
            try sender.receiveAck(.init(cumulativeAck: 0, window: 1 << 20, receivedOnSubflow: UInt64(onA) + 1), on: a)
        }
        // a goes: only what came after its last report is sent again; b's go all.
        #expect(sender.removeSubflow(a) == onA - Int(reported))
        #expect(sender.removeSubflow(b) == onB)
        // Late, on a subflow already gone: changes nothing, whatever it says.
        #expect(try sender.receiveAck(.init(cumulativeAck: 0, window: 1 << 20, receivedOnSubflow: .max), on: a) == .none)
    }

    @Test("a UDP subflow reports nothing: datagrams are lost and resent, so its count is no prefix of what was sent")
    func unorderedSubflowsDoNotReport() throws {
        var receiver = SessionCore(configuration: .init(), peerInitialWindow: 0)
        receiver.addSubflow(a, backup: false, ordered: false)
        _ = receiver.drain()
        _ = try receiver.receiveData(.init(sequence: 100, payload: buffer(patternBytes(40_000, seed: 12))), on: a)
        receiver.readBatchComplete()
        _ = try receiver.receiveData(.init(sequence: 0, payload: buffer(patternBytes(100, seed: 13))), on: a)
        receiver.readBatchComplete()
        let acks = receiver.drain()
        #expect(acks == [.dataAck(a, .init(cumulativeAck: 40_100, window: UInt32(SessionCore.Configuration().receiveCapacity - 40_100)))])
    }

    // MARK: protocol errors

    @Test("DATA beyond the receive window")
    func dataBeyondWindow() {
        var core = makeCore(coreConfiguration(receive: 1000), peerWindow: 0, subflows: [(a, false)])
        #expect(throws: SessionProtocolError.dataBeyondWindow(sequence: 1000, rightEdge: 1000)) {
            try core.receiveData(.init(sequence: 1000, payload: buffer([1])), on: a)
        }
        #expect(throws: SessionProtocolError.dataBeyondWindow(sequence: 990, rightEdge: 1000)) {
            try core.receiveData(.init(sequence: 990, payload: buffer(patternBytes(11, seed: 11))), on: a)
        }
    }

    @Test("DATA after the DATA_FIN")
    func dataAfterFin() throws {
        var core = makeCore(peerWindow: 0, subflows: [(a, false)])
        _ = try core.receiveData(.init(sequence: 0, payload: buffer(patternBytes(10, seed: 12))), on: a)
        _ = try core.receiveFin(.init(finalSequence: 10))
        #expect(throws: SessionProtocolError.dataAfterFin(sequence: 10, final: 10)) {
            try core.receiveData(.init(sequence: 10, payload: buffer([1])), on: a)
        }
        #expect(throws: SessionProtocolError.dataAfterFin(sequence: 5, final: 10)) {
            try core.receiveData(.init(sequence: 5, payload: buffer(patternBytes(6, seed: 13))), on: a)
        }
        // A duplicate of data before the FIN is fine.
        #expect(try core.receiveData(.init(sequence: 0, payload: buffer(patternBytes(10, seed: 12))), on: a) == .none)
    }

    @Test("a DATA_FIN below data already received or beyond the window")
    func badFin() {
        var core = makeCore(coreConfiguration(receive: 1000), peerWindow: 0, subflows: [(a, false)])
        _ = try? core.receiveData(.init(sequence: 0, payload: buffer(patternBytes(20, seed: 14))), on: a)
        #expect(throws: SessionProtocolError.dataAfterFin(sequence: 20, final: 10)) { try core.receiveFin(.init(finalSequence: 10)) }
        #expect(throws: SessionProtocolError.self) { try core.receiveFin(.init(finalSequence: 1001)) }
        #expect(core.remoteFinalSequence == nil)
    }

    @Test("a DATA_FIN that moves")
    func conflictingFin() throws {
        var core = makeCore(peerWindow: 0, subflows: [(a, false)])
        _ = try core.receiveFin(.init(finalSequence: 10))
        #expect(throws: SessionProtocolError.conflictingFin(10, 20)) { try core.receiveFin(.init(finalSequence: 20)) }
        #expect(throws: SessionProtocolError.conflictingFin(10, 9)) { try core.receiveFin(.init(finalSequence: 9)) }
    }

    @Test("a DATA_ACK for data never sent")
    func ackBeyondSent() throws {
        var core = makeCore(peerWindow: 100, subflows: [(a, false)])
        core.write(buffer(patternBytes(200, seed: 15)))
        _ = core.drain()
        // Written but not sent (beyond the window) counts as never sent.
        #expect(throws: SessionProtocolError.ackBeyondSent(ack: 150, sent: 100)) { try core.receiveAck(.init(cumulativeAck: 150, window: 100)) }
        // One past the end is a FIN ack only once a FIN exists.
        #expect(throws: SessionProtocolError.ackBeyondSent(ack: 101, sent: 100)) { try core.receiveAck(.init(cumulativeAck: 101, window: 100)) }
        #expect(throws: SessionProtocolError.self) { try core.receiveAck(.init(cumulativeAck: .max, window: .max)) }
    }

    @Test("errors describe themselves")
    func errorDescriptions() {
        let errors: [SessionProtocolError] = [.dataBeyondWindow(sequence: 1, rightEdge: 0), .dataAfterFin(sequence: 1, final: 0),
                                              .ackBeyondSent(ack: 1, sent: 0), .conflictingFin(1, 2)]
        for error in errors { #expect(!error.description.isEmpty) }
    }

    /// Data past the final sequence number is refused when the DATA_FIN came first, and a FIN below
    /// data already received out of order is refused too (accepting it left a stream that never
    /// finished).
    @Test("DATA beyond a DATA_FIN is a protocol error in either order")
    func dataBeyondFinBeforeFin() throws {
        var core = makeCore(peerWindow: 0, subflows: [(a, false)])
        _ = try core.receiveData(.init(sequence: 0, payload: buffer(patternBytes(10, seed: 16))), on: a)
        _ = try core.receiveData(.init(sequence: 20, payload: buffer(patternBytes(10, seed: 17))), on: a)
        do {
            #expect(throws: SessionProtocolError.self) { try core.receiveFin(.init(finalSequence: 25)) }
        }
    }

    /// The listener creates its SessionCore with peerInitialWindow 0 (the OPEN carries no window),
    /// so the opener must announce its window before it has anything to acknowledge.
    @Test("a server that speaks first can send: the opener announces its window")
    func serverSpeaksFirst() throws {
        let window = UInt32(SessionCore.Configuration().receiveCapacity)
        var client = SessionCore(peerInitialWindow: window)  // from the ACCEPT
        var server = SessionCore(peerInitialWindow: 0)  // as Listener.swift sets it up
        client.addSubflow(a, backup: false)
        server.addSubflow(a, backup: false)
        server.write(buffer(Array("220 ready\r\n".utf8)))
        #expect(server.drain().allSatisfy { $0.dataRange == nil })  // no window yet: only its own announcement
        #expect(client.drain() == [.dataAck(a, .init(cumulativeAck: 0, window: window))])
        _ = try server.receiveAck(.init(cumulativeAck: 0, window: window))
        #expect(server.drain().compactMap(\.dataRange) == [0..<11])
    }

    @Test("a CLOSE after our DATA_FIN acknowledges data whose DATA_ACK was lost, and nothing before the FIN")
    func closeAcknowledgesLostDataAcks() throws {
        var client = SessionCore(peerInitialWindow: 1 << 20)
        client.addSubflow(a, backup: false)
        client.write(buffer(patternBytes(5000, seed: 4)))
        _ = client.drain()
        #expect(client.receivePeerClose() == .none, "no DATA_FIN sent yet: the CLOSE cannot cover data still to come")
        client.finish()
        _ = client.drain()
        _ = try client.receiveFin(.init(finalSequence: 0))
        #expect(client.unacknowledgedBytes == 5000)
        #expect(client.receivePeerClose() == .sendProgress)
        #expect(client.unacknowledgedBytes == 0)
        #expect(client.isTransportFinished)
    }

    @Test("a CLOSE stands for the lost ack of our DATA_FIN, and only when nothing else is outstanding")
    func closeAcknowledgesFin() throws {
        var server = SessionCore(peerInitialWindow: 1 << 20)
        server.addSubflow(a, backup: false)
        server.write(buffer(patternBytes(1000, seed: 3)))
        // Our data outstanding and no DATA_FIN sent: a CLOSE proves nothing about it.
        _ = server.drain()
        #expect(server.receivePeerClose() == .none)
        _ = try server.receiveAck(.init(cumulativeAck: 1000, window: 1 << 20))
        // The peer's DATA_FIN is not in yet: still nothing.
        server.finish()
        _ = server.drain()
        #expect(server.receivePeerClose() == .none)
        _ = try server.receiveFin(.init(finalSequence: 0))
        #expect(!server.isTransportFinished)
        // Everything in, only our DATA_FIN's ack missing: the CLOSE completes it.
        #expect(server.receivePeerClose() == .sendProgress)
        #expect(server.isTransportFinished)
        #expect(server.receivePeerClose() == .none)
    }

    @Test("a close timeout ends as closed only when the ack of our DATA_FIN is all that is missing")
    func closeTimeoutWithOnlyFinAckMissing() throws {
        var server = SessionCore(peerInitialWindow: 1 << 20)
        server.addSubflow(a, backup: false)
        let concluded1 = server.concludeWithoutFinalAck()
        #expect(!concluded1, "nothing finished yet")
        server.write(buffer(patternBytes(1000, seed: 5)))
        server.finish()
        _ = server.drain()
        _ = try server.receiveFin(.init(finalSequence: 0))
        let concluded2 = server.concludeWithoutFinalAck()
        #expect(!concluded2, "our data is not acknowledged: the peer may lack it")
        _ = try server.receiveAck(.init(cumulativeAck: 1000, window: 1 << 20))
        // The subflow that carried our DATA_FIN went (the FIN waits to go again): still only its ack missing.
        server.removeSubflow(a)
        let concluded3 = server.concludeWithoutFinalAck()
        #expect(concluded3)
        #expect(server.isTransportFinished)
        let concluded4 = server.concludeWithoutFinalAck()
        #expect(!concluded4, "once")

        var client = SessionCore(peerInitialWindow: 1 << 20)
        client.addSubflow(a, backup: false)
        client.finish()
        _ = client.drain()
        _ = try client.receiveData(.init(sequence: 0, payload: buffer(patternBytes(10, seed: 6))), on: a)
        _ = try client.receiveFin(.init(finalSequence: 20))
        let concluded5 = client.concludeWithoutFinalAck()
        #expect(!concluded5, "a hole in the peer's stream: its bytes 10..<20 never came")
    }

    @Test("our DATA_FIN counts as unacknowledged only once it is out and all that is")
    func unacknowledgedFin() throws {
        var core = SessionCore(peerInitialWindow: 1 << 20)
        core.addSubflow(a, backup: false)
        core.addSubflow(b, backup: false)
        core.write(buffer(patternBytes(1000, seed: 7)))
        core.finish()
        let sent = core.drain()
        let carrier = try #require(sent.compactMap { if case .dataFin(let id, _) = $0 { id } else { nil } }.first)
        #expect(core.unacknowledgedFin == nil, "its data is not acknowledged: the peer may lack more than the FIN")
        _ = try core.receiveAck(.init(cumulativeAck: 1000, window: 1 << 20))
        #expect(core.unacknowledgedFin?.carrier == carrier)
        #expect(core.unacknowledgedFin?.fin == .init(finalSequence: 1000))
        // Its carrier gone, the FIN waits to go again, and is not out anywhere until it does.
        core.removeSubflow(carrier)
        #expect(core.unacknowledgedFin == nil)
        let again = core.drain()
        let other = carrier == a ? b : a
        #expect(again.contains(.dataFin(other, .init(finalSequence: 1000))))
        #expect(core.unacknowledgedFin?.carrier == other)
        _ = try core.receiveAck(.init(cumulativeAck: 1001, window: 1 << 20))
        #expect(core.unacknowledgedFin == nil)
        #expect(core.isWriteFinished)
    }

    @Test("the window announcement waits for a subflow, and is sent once")
    func announcementNeedsSubflow() {
        var core = SessionCore(configuration: coreConfiguration(receive: 5000), peerInitialWindow: 0)
        #expect(core.drain().isEmpty)
        core.addSubflow(b, backup: true)
        #expect(core.drain() == [.dataAck(b, .init(cumulativeAck: 0, window: 5000))])
        core.addSubflow(a, backup: false)
        #expect(core.drain().isEmpty)
    }

    @Test("two cores finish a small exchange both ways")
    func smallExchange() throws {
        var client = SessionCore(configuration: coreConfiguration(segment: 1000, receive: 4096), peerInitialWindow: 4096)
        var server = SessionCore(configuration: coreConfiguration(segment: 1000, receive: 4096), peerInitialWindow: 0)
        for id in [a, b] {
            client.addSubflow(id, backup: false)
            server.addSubflow(id, backup: false)
        }
        let up = patternBytes(20_000, seed: 18)
        let down = patternBytes(15_000, seed: 19)
        var upWritten = 0
        var downWritten = 0
        var got = ([UInt8](), [UInt8]())
        for _ in 0..<1000 {
            if upWritten < up.count, client.writableSpace > 0 {
                let n = min(3000, up.count - upWritten)
                client.write(buffer(Array(up[upWritten..<upWritten + n])))
                upWritten += n
                if upWritten == up.count { client.finish() }
            }
            if downWritten < down.count {
                let n = min(5000, down.count - downWritten)
                server.write(buffer(Array(down[downWritten..<downWritten + n])))
                downWritten += n
                if downWritten == down.count { server.finish() }
            }
            try exchange(&client, &server)
            got.0 += server.readAll()
            got.1 += client.readAll()
            if client.isFinished && server.isFinished { break }
        }
        #expect(got.0 == up)
        #expect(got.1 == down)
        #expect(client.isFinished && server.isFinished)
    }

    // MARK: suspended subflows

    @Test("a suspended subflow's data goes elsewhere at once; it carries nothing until resumed")
    func suspend() throws {
        var core = makeCore(coreConfiguration(segment: 100), peerWindow: 10_000, subflows: [(a, false), (b, false)])
        core.recordRTT(a, milliseconds: 1)
        core.recordRTT(b, milliseconds: 50)
        core.write(buffer(patternBytes(250, seed: 20)))
        #expect(core.drain().map(\.subflow) == [a, a, a])
        #expect(core.suspendSubflow(a) == 250)
        #expect(core.isSuspended(a))
        #expect(core.usableSubflows == [b])
        #expect(core.aliveSubflows == [a, b])
        #expect(core.suspendSubflow(a) == 0)  // already suspended
        let moved = core.drain()
        #expect(moved.map(\.subflow) == [b, b, b])
        #expect(moved.allSatisfy { $0.isReinjection })
        #expect(moved.compactMap(\.dataRange) == [0..<100, 100..<200, 200..<250])
        // Acknowledgements avoid it too.
        _ = try core.receiveData(.init(sequence: 0, payload: buffer([1])), on: a)
        core.readBatchComplete()
        #expect(core.drain().map(\.subflow) == [b])
        // Back in service: the faster path is used again.
        core.resumeSubflow(a)
        #expect(!core.isSuspended(a))
        core.write(buffer([1, 2, 3]))
        #expect(core.drain().map(\.subflow) == [a])
        // Suspending a dead or unknown subflow does nothing; resuming does not revive.
        core.removeSubflow(b)
        #expect(core.suspendSubflow(b) == 0)
        core.resumeSubflow(b)
        #expect(core.aliveSubflows == [a])
        #expect(core.suspendSubflow(SubflowID(99)) == 0)
    }

    @Test("a DATA_FIN on a subflow that stalls is sent again elsewhere")
    func suspendResendsFin() throws {
        var core = makeCore(peerWindow: 1000, subflows: [(a, false), (b, false)])
        core.finish()
        #expect(core.drain() == [.dataFin(a, .init(finalSequence: 0))])
        core.suspendSubflow(a)
        #expect(core.drain() == [.dataFin(b, .init(finalSequence: 0))])
    }

    @Test("with every subflow suspended, data waits and acks still go out")
    func allSuspended() throws {
        var core = makeCore(peerWindow: 1000, subflows: [(a, false), (b, true)])
        core.suspendSubflow(a)
        core.suspendSubflow(b)
        #expect(core.usableSubflows.isEmpty)
        #expect(core.scheduledSubflow() == nil)
        core.write(buffer([1, 2, 3]))
        _ = try core.receiveData(.init(sequence: 0, payload: buffer([1])), on: b)
        core.readBatchComplete()
        let sent = core.drain()
        #expect(sent.count == 1)
        #expect(sent.first?.dataRange == nil)
        core.resumeSubflow(b)
        #expect(core.drain().compactMap(\.dataRange) == [0..<3])
    }

    @Test("transport finished: all the peer's data arrived and our FIN is acknowledged, read or not")
    func transportFinished() throws {
        var core = makeCore(peerWindow: 1000, subflows: [(a, false)])
        #expect(!core.isTransportFinished)
        _ = try core.receiveData(.init(sequence: 0, payload: buffer([1, 2, 3])), on: a)
        _ = try core.receiveFin(.init(finalSequence: 3))
        #expect(!core.isTransportFinished)
        core.finish()
        _ = core.drain()
        _ = try core.receiveAck(.init(cumulativeAck: 1, window: 1000))
        #expect(core.isTransportFinished)
        #expect(!core.isFinished)  // not read yet
        #expect(core.readAll() == [1, 2, 3])
        #expect(core.isFinished)
    }

    /// The receiver acknowledges only new data. When its acks are lost on a path that stalls (a
    /// blackhole: nobody removes the subflow, the sender suspends it and reinjects), the reinjected
    /// copies arrive as duplicates and trigger no acknowledgement; a window-limited sender then
    /// waits forever (a DATA_FIN would rescue it, but a sender with more to write never sends one).
    @Test("duplicates after a lost acknowledgement are acknowledged again")
    func lostAckThenDuplicates() throws {
        var sender = makeCore(coreConfiguration(segment: 500), peerWindow: 1000, subflows: [(a, false), (b, false)])
        var receiver = makeCore(coreConfiguration(receive: 1000), peerWindow: 1000, subflows: [(a, false), (b, false)])
        sender.write(buffer(patternBytes(5000, seed: 21)))
        for t in sender.drain() { try receiver.apply(t) }  // [0, 1000) on a, the whole window
        receiver.readBatchComplete()
        #expect(receiver.readAll().count == 1000)
        let lost = receiver.drain()  // the acks, on a: lost in the blackhole
        #expect(lost.allSatisfy { $0.subflow == a })
        #expect(!lost.isEmpty)
        // The sender sees no progress on a and suspends it; so may the receiver.
        #expect(sender.suspendSubflow(a) == 1000)
        receiver.suspendSubflow(a)
        for t in sender.drain() { try receiver.apply(t) }  // the reinjected copies, on b
        receiver.readBatchComplete()
        let acks = receiver.drain()
        do {
            #expect(acks.contains { if case .dataAck(b, let ack) = $0 { ack.cumulativeAck == 1000 } else { false } })
        }
        for t in acks { try sender.apply(t) }
        let next = sender.drain()
        do {
            #expect(next.contains { ($0.dataRange?.lowerBound ?? 0) >= 1000 })
        }
    }
}
