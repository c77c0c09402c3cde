import Logging
import NBSNetlink
import NBSProtocol
import NIOCore
import NIOPosix

/// Runs one session: it owns the subflow channels and feeds a `SessionCore`, performing what the
/// core decides. Confined to one event loop; every subflow of the session lives on that loop, so
/// nothing here needs a lock.
final class SessionEngine: SubflowDelegate {
    enum Role { case opener, listener }

    enum State: Equatable {
        case open
        /// Both DATA_FINs are acknowledged; CLOSE sent, subflows shutting down.
        case closing
        case closed
        case failed(NBSError)
    }

    struct SubflowRecord {
        let handler: any SubflowTransport
        var machine: SubflowStateMachine
        let local: SocketAddress
        var remote: SocketAddress
        let interface: String?
        /// The peer's tag for its interface on this subflow (INTERFACE), when it sent one.
        var peerInterface: UInt32?
        var backup: Bool
        /// Something went out on this subflow since our last PROBE round (see `sendProbes`).
        var wroteSinceProbeRound = false
        var pendingJoin: Frame.Join?
        var established = false
        var closed = false
        var closeReason: String?
        var deliveryRate = DeliveryRate()
    }

    let loop: any EventLoop
    let role: Role
    let localName: String
    let peerName: String
    let port: Int
    let options: NBSOptions
    let logger: Logger
    private(set) var core: SessionCore
    private let keys: SessionKeys
    private var joins: JoinAuthenticator
    private var signals: SignalAuthenticator
    private var records: [SubflowID: SubflowRecord] = [:]
    private var nextSubflowID: UInt32 = 0
    private(set) var state = State.open
    private(set) var maxConcurrentSubflows = 0
    var addressBook: LocalAddressBook
    /// Pairs with a connect in progress, so the mesh is not opened twice; each with its attempt,
    /// so that a connect given up (`PathPlanner.outdated`) is closed when it completes.
    private var connectingPairs: [PathPlanner.Pair: UInt64] = [:]
    private var connectAttempts: UInt64 = 0
    /// Subflows being replaced (`replace`), with the reason they go for.
    private var draining: [SubflowID: String] = [:]
    private(set) var waitingSince: NIODeadline?
    /// Every timer of the session is a `LoopTimer`: stopping one cancels no NIO task (a linear
    /// search in NIO's heap, which at 10,000 sessions on one loop cost more than the timers).
    private lazy var graceTimer = LoopTimer(on: loop, owner: self) { $0.graceEnded() }
    private lazy var rejoinTimer = LoopTimer(on: loop, owner: self) { $0.rejoinFired() }
    /// The loop's `LivenessTicker` that runs the stall checks, at the fast or the idle pace (see
    /// `startLivenessChecks`); nil while they are stopped.
    private(set) var livenessTicker: LivenessTicker?
    var livenessRunning: Bool { livenessTicker != nil }
    /// Something went out on a subflow since the last stall check began (see `startLivenessChecks`).
    private var wroteSinceLivenessCheck = false
    private var interfaceFeed: LoopInterfaceFeed.Membership?
    private var announcedAddressIDs: [String: UInt8] = [:]
    private var suspendedSince: [SubflowID: NIODeadline] = [:]
    /// The sequence whose data `copyHeadOfLine` copied last: one copy per head.
    private var copiedHeadOfLine: UInt64?
    /// When each TCP subflow was first seen repairing a loss, while it still is
    /// (`SubflowProgress.lossRecovery`), and since when the peer's count of what it received there
    /// (`SendBuffer.peerReceived(on:)`) has stood at its current value.
    private var lossRecoverySince: [SubflowID: NIODeadline] = [:]
    private var peerCountSince: [SubflowID: (count: UInt64, since: NIODeadline)] = [:]
    /// The cumulative acknowledgement last seen, and since when (`checkAcknowledgementProgress`).
    private var acknowledgedSince: (acknowledged: UInt64, since: NIODeadline)?
    /// Our DATA_FIN waiting for its ack on `carrier`: since when (or since its last copies), and how
    /// many rounds of copies went out (`checkFinAcknowledgement`).
    private var finWait: (carrier: SubflowID, since: NIODeadline, copies: Int)?
    private(set) var headOfLineCopiedBytes = 0
    private(set) var drainsCutShort = 0
    /// Test hook (`Session.dropArrivingFramesForTesting`): frames lost as if with their subflow.
    var droppedFrameTypesForTesting: Set<FrameType> = []
    /// What `resizeQueues` last applied to each subflow.
    private var queueSizing: [SubflowID: QueueSizing] = [:]
    private struct QueueSizing: Equatable {
        var highWaterMark: Int
        var maxDataPayload: Int?
    }
    private var pendingInterfaceEvents: [InterfaceEvent] = []
    private var refusedJoinRetries = 0
    /// Our interfaces' tags in INTERFACE hints, numbered by first use in this session.
    private var interfaceTags: [String: UInt32] = [:]
    private(set) var rejectedSignals = 0
    var peerAddresses: [SocketAddress]

    private var readWaiters = CircularBuffer<(maxBytes: Int, wait: LoopWait<[ByteBuffer]?>)>()
    /// Writes waiting for send-buffer space, in order; `size` tells whether the first one was taken
    /// in part (see `cancelWrite`).
    private var writeWaiters = CircularBuffer<(bytes: ByteBuffer, size: Int, wait: LoopWait<Void>)>()
    private var finishRequested = false
    private var closeWaiters: [LoopWait<Void>] = []
    private let eventContinuation: AsyncStream<SessionEvent>.Continuation
    let events: AsyncStream<SessionEvent>
    private var pumpScheduled = false
    private var pumping = false
    private lazy var probeTimer = LoopTimer(on: loop, owner: self) { $0.probesDue() }
    private var probeDelay = TimeAmount.zero
    /// Passes of the pump that put something on a subflow: idle timers compare it with what they
    /// saw last time to tell an idle session from a busy one.
    private var transmissions = 0
    private var transmissionsAtProbe = 0
    private lazy var lingerTimer = LoopTimer(on: loop, owner: self) { $0.lingerEnded() }
    /// Set by whoever verified the peer's name before handing the session out.
    var peerVerification: PeerVerification = .claimed
    /// Called once when the session ends, so a listener can forget its token.
    var onTerminate: (() -> Void)?

    init(loop: any EventLoop, role: Role, localName: String, peerName: String, port: Int, options: NBSOptions,
         keys: SessionKeys, token: UInt64, peerInitialWindow: UInt32, addressBook: LocalAddressBook, peerAddresses: [SocketAddress]) {
        self.loop = loop
        self.role = role
        self.localName = localName
        self.peerName = peerName
        self.port = port
        self.options = options
        self.core = SessionCore(configuration: options.coreConfiguration, peerInitialWindow: peerInitialWindow)
        self.keys = keys
        self.joins = JoinAuthenticator(keys: keys, token: token)
        self.signals = SignalAuthenticator(keys: keys, localRole: role == .opener ? .client : .server)
        self.addressBook = addressBook
        self.peerAddresses = peerAddresses
        var logger = Logger(label: "nbs.session")
        logger[metadataKey: "session"] = "\(String(token, radix: 16))"
        self.logger = logger
        (events, eventContinuation) = AsyncStream.makeStream(of: SessionEvent.self, bufferingPolicy: .bufferingNewest(1024))
    }

    private var bound: NIOLoopBound<SessionEngine> { NIOLoopBound(self, eventLoop: loop) }

    // MARK: subflows

    private func allocateID() -> SubflowID {
        defer { nextSubflowID += 1 }
        return SubflowID(nextSubflowID)
    }

    var liveSubflowCount: Int { records.values.filter { !$0.closed }.count }

    /// Adopts a subflow whose handshake already completed (the first one, or a verified JOIN).
    func adoptEstablished(_ handler: any SubflowTransport, machine: SubflowStateMachine, local: SocketAddress, remote: SocketAddress, backup: Bool, rttSample: Double? = nil) {
        loop.preconditionInEventLoop()
        let id = allocateID()
        handler.id = id
        handler.delegate = self
        records[id] = SubflowRecord(handler: handler, machine: machine, local: local.unmapped, remote: remote.unmapped,
                                    interface: addressBook.interface(for: local.unmapped), backup: backup, established: true)
        startProbingIfNeeded()
        subflowEstablished(id, backup: backup, rttSample: rttSample)
    }

    /// The subflow's handshake is done: it joins the data plane.
    private func subflowEstablished(_ id: SubflowID, backup: Bool, rttSample: Double?) {
        records[id]?.handler.joinedSession()
        core.addSubflow(id, backup: backup, ordered: records[id]?.handler.deliversInOrder ?? true)
        updatePathGroup(id)
        core.setSegmentLimit(id, records[id]?.handler.maxDataPayload ?? SubflowConnector.writeWaterMark.high / Self.segmentsPerQueue)
        if let rttSample { core.recordRTT(id, milliseconds: rttSample) }
        core.setWritable(id, records[id]?.handler.isWritable ?? false)
        maxConcurrentSubflows = max(maxConcurrentSubflows, core.aliveSubflows.count)
        eventContinuation.yield(.subflowUp(info(id)))
        pathRestored()
        // After the pump: a listener's first frame after ACCEPT must be its DATA_ACK, the verdict.
        pump()
        announceInterface(id)
        copyUnacknowledgedFin(to: id)
    }

    /// Our DATA_FIN still waits for its acknowledgement when a subflow comes up: that path has just
    /// carried the peer's JOIN, so it is the likeliest to carry the FIN. The copies on a timer
    /// (`checkFinAcknowledgement`) come 1, 2, 4, 8, 16 s apart: an opener that moved and joined
    /// just after one waited up to 16 s, longer than its close timeout allowed once (the debug UDP
    /// soak in CI, seed 93324940: "the peer did not finish the session in time").
    private func copyUnacknowledgedFin(to id: SubflowID) {
        guard let (carrier, fin) = core.unacknowledgedFin, carrier != id, let record = records[id] else { return }
        record.handler.write(.dataFin(fin), flush: true)
        logger.info("our DATA_FIN on subflow \(carrier) is unacknowledged: copied to subflow \(id), just up")
    }

    private func announceInterface(_ id: SubflowID) {
        guard let record = records[id], let interface = record.interface else { return }
        let tag = interfaceTags[interface] ?? UInt32(interfaceTags.count + 1)
        interfaceTags[interface] = tag
        record.handler.write(.interface(.init(tag: tag)))
    }

    /// Subflows between the same two interfaces most likely share one bottleneck. Until the peer
    /// names its interface, only those to the same peer address are known to (two of our addresses
    /// on one interface); a subflow whose local interface is unknown is grouped with none.
    private func updatePathGroup(_ id: SubflowID) {
        guard options.siblingSubflowsStandBy, let record = records[id], let interface = record.interface else { return }
        let peerSide = record.peerInterface.map { "interface \($0)" } ?? "address \(record.remote.hostString)"
        core.setPathGroup(id, "\(interface) > peer \(peerSide)")
    }

    /// Local addresses subflows may start from: the fixed list from the options, else what the
    /// interface monitor currently deems usable.
    var candidateLocalAddresses: [SocketAddress] { options.localAddresses ?? addressBook.addresses }

    /// Opener: the full mesh of same-family (local, remote) pairs, within the subflow limit,
    /// without the pairs already in use or being connected.
    func joinMissingPairs() {
        guard role == .opener, state == .open else { return }
        let live = records.values.filter { !$0.closed }
        var inUse = Set(live.map { PathPlanner.Pair(local: $0.local.hostString, remote: $0.remote.hostString) }).union(connectingPairs.keys)
        for pair in PathPlanner.outdated(connecting: connectingPairs.keys, peers: peerAddresses, inUse: inUse) {
            logger.info("join \(pair.local) → \(pair.remote) given up: the peer has a closer address")
            connectingPairs[pair] = nil
            inUse.remove(pair)
        }
        let established = records.filter { !$0.value.closed && $0.value.established }
            .map { (id: $0.key.rawValue, local: $0.value.local, remote: $0.value.remote) }
        // A draining subflow is as good as gone to the planner, and its slot as taken: it goes
        // once drained, and only then is its replacement joined (the peer counts it till then).
        let staying = established.filter { draining[SubflowID($0.id)] == nil }
        let slots = options.maxSubflows - draining.count
        if connectingPairs.isEmpty, draining.isEmpty,
            let swap = PathPlanner.replacement(locals: candidateLocalAddresses, peers: peerAddresses, live: staying, maxSubflows: slots) {
            return replace(SubflowID(swap.retire), reason: "replaced by a subflow from \(swap.for.hostString)")
        }
        if connectingPairs.isEmpty, let worse = PathPlanner.upgrade(peers: peerAddresses, live: staying, maxSubflows: slots) {
            return replace(SubflowID(worse), reason: "replaced by a closer pair")
        }
        let plan = PathPlanner.joins(locals: candidateLocalAddresses, peers: peerAddresses, inUse: inUse,
                                     liveCount: live.count + connectingPairs.count, maxSubflows: options.maxSubflows,
                                     policy: options.policy, hasRegularSubflow: core.aliveSubflows.contains { !core.isBackup($0) })
        logger.debug("mesh: locals \(candidateLocalAddresses.map(\.hostString)) peers \(peerAddresses.map(\.hostString)) in use \(inUse.map { "\($0.local)>\($0.remote)" }) -> \(plan.map { "\($0.local.hostString)>\($0.remote.hostString)" })")
        for join in plan { startJoin(from: join.local, to: join.remote, backup: join.backup) }
    }

    private func startJoin(from local: SocketAddress, to remote: SocketAddress, backup: Bool) {
        let bound = self.bound
        let pair = PathPlanner.Pair(local: local.hostString, remote: remote.hostString)
        connectAttempts += 1
        let attempt = connectAttempts
        connectingPairs[pair] = attempt
        SubflowConnector.connectTransport(on: loop, from: local, to: remote, options: options).whenComplete { result in
            let engine = bound.value
            guard engine.connectingPairs[pair] == attempt else {
                if case .success(let handler) = result { handler.value.writeAndClose(nil) }
                return
            }
            engine.connectingPairs[pair] = nil
            switch result {
            case .success(let handler):
                engine.joinConnected(handler.value, local: local, remote: remote, backup: backup)
            case .failure(let error):
                engine.logger.debug("join \(local.hostString) → \(remote.hostString) failed: \(error)")
                engine.checkSubflowsLeft()
            }
        }
    }

    private func joinConnected(_ handler: any SubflowTransport, local: SocketAddress, remote: SocketAddress, backup: Bool) {
        // The address may have gone while the connection was being made.
        guard state == .open, liveSubflowCount < options.maxSubflows,
            candidateLocalAddresses.contains(where: { $0.hostString == local.hostString })
        else {
            handler.writeAndClose(nil)
            return
        }
        let id = allocateID()
        handler.id = id
        handler.delegate = self
        let join = joins.makeJoin(backup: backup)
        records[id] = SubflowRecord(handler: handler, machine: .openerSide(joining: true), local: local, remote: remote,
                                    interface: addressBook.interface(for: local), backup: backup, pendingJoin: join)
        handler.write(.join(join))
        handler.handshakeSentAt = .now()
        LoopTimer.once(on: loop, owner: self, in: SubflowConnector.handshakeBudget(options, connectDeferred: handler.connectDeferred)) { engine in
            if let record = engine.records[id], !record.established, !record.closed {
                engine.retire(id, reason: "JOIN timed out", abort: .timeout)
            }
        }
    }

    func installKeys(on handler: any SubflowTransport) {
        handler.installKeys(keys, localRole: role == .opener ? .client : .server)
    }

    /// Listener: a JOIN arrived on a new connection for this session's token, from `remote` to `local`.
    ///
    /// At the subflow limit, a JOIN replaces a subflow here that is suspended, the one over the
    /// same pair of addresses if there is one: the opener joins at its limit only once it has given
    /// one of its subflows up, most likely that one, and its close did not get here (UDP datagrams
    /// lost under load; an address that moved, whose REMOVE_ADDR rode a path that was failing too).
    /// Refusing left both ends waiting until the listener's own stall checks retired it: at 10,000
    /// UDP sessions, 75,000 refused JOINs in 3 min and sessions without a path for up to 55 s; in
    /// the soak, bursts of hundreds of refused JOINs from moved addresses, each retried up to five
    /// times. Only a suspended one: in the soak (seed 550972306) an opener joined a pair whose
    /// subflow was still alive on both ends while it rearranged its pairs, and replacing that one,
    /// with an ABORT as first written, aborted the session. The replaced subflow is closed, not
    /// aborted. Only an authenticated JOIN replaces anything.
    func verifyJoin(_ join: Frame.Join, local: SocketAddress, remote: SocketAddress) -> JoinAuthenticator.JoinVerdict {
        guard state == .open else { return .refused(.shuttingDown) }
        var replaced: (id: SubflowID, samePair: Bool)?
        if liveSubflowCount >= options.maxSubflows {
            // The same pair first; then one to the same address here, which an opener that moved
            // joins again from its new address; then one of the same family. Taking the lowest
            // suspended id instead, a moved IPv4 address's JOIN took the place of a suspended IPv6
            // subflow, and the next JOIN that of a suspended subflow on the path that had not moved
            // (soak, seeds 734962215 and 1003399911).
            let localHost = local.unmapped.hostString, joiner = remote.unmapped
            func rank(_ record: SubflowRecord) -> Int {
                if record.local.hostString == localHost { return record.remote.hostString == joiner.hostString ? 0 : 1 }
                return record.remote.unmapped.protocol == joiner.protocol ? 2 : 3
            }
            let suspended = records.filter { id, record in !record.closed && record.established && core.isSuspended(id) }
            guard let best = suspended.min(by: { (rank($0.value), $0.key) < (rank($1.value), $1.key) }) else {
                // The opener most likely lost one of ours and no word of it got here (a UDP socket
                // its kernel closed on a failed send, a reset lost with its path), and an idle
                // session's PROBEs may be backed off to 32 s: the dead one is found by a PROBE now,
                // suspended, and replaced at the opener's retry. In the debug UDP soak (seed 31337)
                // 16 waiting openers were refused 50,000 times in three minutes and failed.
                if case .accepted = joins.verify(join) { probeNow() }
                return .refused(.tooManySubflows)
            }
            replaced = (best.key, rank(best.value) == 0)
        }
        let verdict = joins.verify(join)
        if case .accepted = verdict, let replaced {
            retire(replaced.id, reason: replaced.samePair ? "replaced by a new JOIN over the same addresses" : "suspended, replaced by a new JOIN from \(remote.unmapped.hostString)")
        }
        return verdict
    }

    /// Closes one subflow; its unacknowledged data goes out on the others at once.
    /// ABORT is authenticated once the subflow belongs to the session; before that there is no key.
    private func abortFrame(for record: SubflowRecord, _ reason: CloseReason, _ message: String) -> Frame {
        record.established ? signals.close(reason, message, abort: true) : .abort(.init(reason: reason, message: message))
    }

    func retire(_ id: SubflowID, reason: String, abort: CloseReason? = nil, reset: Bool = false) {
        guard let record = records[id], !record.closed else { return }
        let farewell = abort.map { abortFrame(for: record, $0, reason) }
        // Account for the loss (and reinject) before closing: the close reports back synchronously.
        subflowGone(id, reason: reason)
        if reset { record.handler.resetAndClose() } else { record.handler.writeAndClose(farewell) }
    }

    private func subflowGone(_ id: SubflowID, reason: String) {
        guard var record = records[id], !record.closed else { return }
        record.closed = true
        record.closeReason = reason
        record.machine.closed()
        records[id] = record
        lossRecoverySince[id] = nil
        peerCountSince[id] = nil
        guard record.established else {
            logger.debug("subflow \(id) \(record.local.hostString) → \(record.remote.hostString) closed before it was established: \(reason)")
            checkSubflowsLeft()
            return
        }
        let reinjected = core.removeSubflow(id)
        if state == .open {
            logger.info("subflow \(id) \(record.local.hostString) → \(record.remote.hostString) down: \(reason); reinjecting \(reinjected) bytes")
            eventContinuation.yield(.subflowDown(info(id), reason: reason))
            if reinjected > 0 { eventContinuation.yield(.reinjected(bytes: reinjected, from: id.rawValue)) }
            checkSubflowsLeft()
            pump()
        } else if state == .closing {
            checkClosingDone()
        }
    }

    /// Losing every path is not fatal: the session waits for one to come back (a new local
    /// address, or the peer at a new address) for the grace period.
    private func checkSubflowsLeft() {
        guard state == .open, core.aliveSubflows.isEmpty, waitingSince == nil else { return }
        let pending = records.values.contains { !$0.closed && !$0.established } || !connectingPairs.isEmpty
        guard options.waitingGracePeriod > .zero else {
            if !pending { fail(.allSubflowsLost, notifyPeer: nil) }
            return
        }
        waitingSince = .now()
        logger.info("every path lost; waiting up to \(options.waitingGracePeriod) for one to return")
        eventContinuation.yield(.waiting)
        graceTimer.arm(in: options.waitingGracePeriod)
        if role == .opener { rejoinTimer.arm(in: .zero) }
    }

    private func graceEnded() {
        if waitingSince != nil { fail(.allSubflowsLost, notifyPeer: nil) }
    }

    private func rejoinFired() {
        guard state == .open, waitingSince != nil else { return }
        rejoinTimer.arm(in: options.rejoinInterval)
        rejoin()
    }

    /// While waiting: ask the resolver again (both ends may have moved) and try the mesh.
    private func rejoin() {
        guard state == .open, waitingSince != nil else { return }
        joinMissingPairs()
        let bound = self.bound
        let resolver = options.resolver
        let name = peerName
        let port = self.port
        Task {
            guard let fresh = try? await resolver.resolve(name, port: port) else { return }
            bound.eventLoop.execute { bound.value.learnPeerAddresses(fresh, resolved: true) }
        }
    }

    private func learnPeerAddresses(_ addresses: [SocketAddress], resolved: Bool = false) {
        var added = false
        for address in addresses.map(\.unmapped) where !peerAddresses.contains(where: { $0.hostString == address.hostString }) {
            peerAddresses.append(address)
            added = true
        }
        guard added else { return }
        if resolved {
            logger.info("re-resolved \(peerName): \(addresses.map(\.hostString).joined(separator: ", "))")
            eventContinuation.yield(.peerResolved(name: peerName, addresses: addresses))
        }
        joinMissingPairs()
    }

    private func pathRestored() {
        guard waitingSince != nil else { return }
        waitingSince = nil
        graceTimer.stop()
        rejoinTimer.stop()
        logger.info("a path is back; resuming")
        eventContinuation.yield(.resumed)
    }

    // MARK: path management: interfaces, addresses, stalls

    /// Joins this loop's feed of interface events and starts stall detection. The feed first
    /// replays the current state if it differs from the address book; addresses already known are
    /// no-ops.
    func startPathManagement() {
        joinMissingPairs()
        startLivenessChecks()
        guard let monitor = options.interfaceMonitor else { return }
        let bound = self.bound
        interfaceFeed = LoopInterfaceFeed.join(monitor, on: loop, knowing: addressBook) { bound.value.interfaceEvent($0) }
    }

    /// Events are handled in batches a few milliseconds long: an address storm (hundreds added and
    /// removed) then costs one pass, and an address that comes and goes within a batch costs nothing.
    func interfaceEvent(_ event: InterfaceEvent) {
        guard state == .open else { return }
        // A loss that takes live subflows with it is handled at once: every millisecond of it is
        // a stall for the receiver. Everything else waits for the batch.
        if pendingInterfaceEvents.isEmpty, !PathPlanner.affected(by: event, subflows: liveSubflowSummary).ids.isEmpty {
            return retireAffected(by: event)
        }
        pendingInterfaceEvents.append(event)
        guard pendingInterfaceEvents.count == 1 else { return }
        let bound = self.bound
        loop.scheduleTask(in: Self.interfaceEventBatching) { bound.value.processInterfaceEvents() }
    }

    static let interfaceEventBatching = TimeAmount.milliseconds(5)

    private func processInterfaceEvents() {
        let events = pendingInterfaceEvents
        pendingInterfaceEvents = []
        guard state == .open else { return }
        // Links first, at once; for addresses only the last word on each counts.
        var lastWord: [String: InterfaceEvent] = [:]
        var order: [String] = []
        for event in events {
            switch event {
            case .addressAdded(let address), .addressRemoved(let address):
                let ip = PathPlanner.normalizedIP(address.address)
                if lastWord[ip] == nil { order.append(ip) }
                lastWord[ip] = event
            default:
                retireAffected(by: event)
            }
        }
        var added = false
        for ip in order {
            guard let event = lastWord[ip] else { continue }
            if case .addressAdded(let address) = event {
                guard options.localAddresses == nil, address.isUsableForSubflows || address.isLoopback,
                    let socketAddress = try? SocketAddress(ipAddress: ip, port: 0),
                    addressBook.add(socketAddress, interface: address.interfaceName)
                else { continue }
                logger.info("new local address \(ip) on \(address.interfaceName)")
                eventContinuation.yield(.localAddressAdded(socketAddress, interface: address.interfaceName))
                announce(socketAddress)
                added = true
            } else {
                retireAffected(by: event)
            }
        }
        if added { joinMissingPairs() }
    }

    private var liveSubflowSummary: [(id: UInt32, local: String, interface: String?)] {
        records.filter { !$0.value.closed }.map { (id: $0.key.rawValue, local: $0.value.local.hostString, interface: $0.value.interface) }
    }

    private func retireAffected(by event: InterfaceEvent) {
        let affected = PathPlanner.affected(by: event, subflows: liveSubflowSummary)
        switch event {
        case .interfaceDown(let interface), .interfaceRemoved(let interface):
            if !affected.ids.isEmpty { eventContinuation.yield(.interfaceDown(interface.name)) }
        default:
            break
        }
        // All of them before any data moves: one link takes its IPv4 and IPv6 subflows together,
        // and what the first carried must not be handed to the next about to go.
        withPumpHeld {
            for id in affected.ids { retire(SubflowID(id), reason: affected.reason) }
        }
        if let removed = affected.removedAddress, addressBook.remove(removed) || !affected.ids.isEmpty {
            if let address = try? SocketAddress(ipAddress: removed, port: 0) { eventContinuation.yield(.localAddressRemoved(address)) }
            withdraw(removed)
        }
    }

    /// ADD_ADDR on a live subflow. The listener announces its port so the opener can join it.
    private func announce(_ address: SocketAddress) {
        guard let carrier = core.aliveSubflows.first, let record = records[carrier] else { return }
        let ip = address.hostString
        let id = announcedAddressIDs[ip] ?? UInt8(truncatingIfNeeded: announcedAddressIDs.count + 1)
        announcedAddressIDs[ip] = id
        guard let wire = address.withPort(role == .listener ? port : 0).wireAddress else { return }
        record.handler.write(signals.addAddress(wire, id: id))
    }

    private func withdraw(_ ip: String) {
        guard let carrier = core.aliveSubflows.first, let record = records[carrier],
            let wire = (try? SocketAddress(ipAddress: ip, port: 0))?.wireAddress
        else { return }
        announcedAddressIDs[ip] = nil
        record.handler.write(signals.removeAddress(wire))
    }

    /// Every `livenessInterval` while there is something to watch; checking 10,000 idle sessions
    /// every 50 ms would be 400,000 TCP_INFO calls a second (2,000 idle sessions kept a serve at
    /// 58 % of a core). A check that finds nothing to watch stops them: no subflow's transport has
    /// anything unacknowledged in flight (TCP_INFO, or the UDP loss recovery), no session data is
    /// unacknowledged, no subflow is suspended and nothing was written since the previous check.
    /// Any write to a subflow starts them again (`subflowSent`), whoever made it: the pump, a
    /// PROBE or its answer, a signal, a UDP keepalive or retransmission. A path that dies while
    /// idle is found by the next probe (they back off to 32 s): it stays in flight, and the checks
    /// run until it is acknowledged or the subflow is retired.
    ///
    /// An earlier version (7eb9c6a) judged idleness by what the pump sent, and restarted the checks
    /// only from the pump. A listener that only receives writes nothing through the pump while no
    /// data arrives, so its checks stopped for good 50 ms after the session was admitted whenever
    /// the opener's first subflow wedged before any data got through (seen in the soak, seed
    /// 290845780). Its subflows to the opener's addresses that then went away (moves, flaps; the
    /// REMOVE_ADDR rode the wedged subflow) carried unanswered PROBEs but were never suspended or
    /// retired, filled the listener's subflow limit, and the opener's JOINs were refused until its
    /// grace period ended.
    ///
    /// The checks start and stop often, and at 10,000 sessions a timer each made 200,000 timers a
    /// second: one `LivenessTicker` per event loop runs the checks of every session that wants them,
    /// and stopping only clears the flag (the ticker drops the session at its next tick).
    ///
    /// The checks run every `livenessInterval` while session data is unacknowledged, where a stall
    /// costs delivery time; with only probes in flight or a suspended subflow to watch, every
    /// `idleLivenessInterval`. At 10,000 UDP sessions, a burst that delayed answers suspended
    /// thousands of idle subflows at once, and checking each of them 20 times a second took two
    /// thirds of the serve's loop: its one socket went unread and overflowed, which suspended more.
    private func startLivenessChecks() {
        guard options.livenessInterval > .zero, state == .open else { return }
        let fast = core.unacknowledgedBytes > 0
        if let current = livenessTicker, !fast || current.interval == options.livenessInterval { return }
        runLivenessChecks(every: fast ? options.livenessInterval : idleLivenessInterval)
    }

    private var idleLivenessInterval: TimeAmount { max(options.livenessInterval, options.idleLivenessInterval) }

    private func runLivenessChecks(every interval: TimeAmount) {
        let ticker = LivenessTicker.on(loop, interval: interval)
        livenessTicker = ticker
        ticker.add(self)
    }

    /// The ticker's call, while it is this session's `livenessTicker`.
    func livenessTick() {
        guard livenessRunning else { return }
        checkStalls()
    }

    private func stopLivenessChecks() {
        livenessTicker = nil
    }

    /// Data unacknowledged for `acknowledgementSilence` though the peer reported holding the oldest of
    /// it: its DATA_ACKs were most likely lost with a subflow, and it has no reason to send another
    /// until something new arrives (`SessionCore.resendOldestHeld`).
    private func checkAcknowledgementProgress() {
        let now = NIODeadline.now()
        let acknowledged = core.send.acknowledged
        guard core.unacknowledgedBytes > 0, let since = acknowledgedSince, since.acknowledged == acknowledged else {
            acknowledgedSince = (acknowledged, now)
            return
        }
        guard now - since.since >= Self.acknowledgementSilence else { return }
        acknowledgedSince = (acknowledged, now)
        if core.resendOldestHeld() > 0 { pump() }
    }

    static let acknowledgementSilence = TimeAmount.seconds(1)

    /// Our DATA_FIN, every byte before it acknowledged, unacknowledged for `acknowledgementSilence`
    /// (doubled after each round, so a close storm adds little): a copy goes on every other usable
    /// subflow, as the peer may hold the carrier dead while it looks alive here. Over UDP, SwiftNIO
    /// closes a socket whose send fails (EPERM under a blackhole's drop rule), and only silence
    /// tells the other end, which a loaded listener's stall check took seconds to minutes to count.
    /// In the debug UDP soak (seed 4242) 101 of round 1's 200 openers waited for a DATA_FIN sent on
    /// such a subflow, connected over two others, until the listener's close timeout ended its side.
    private func checkFinAcknowledgement(now: NIODeadline) {
        guard let (carrier, fin) = core.unacknowledgedFin else { return finWait = nil }
        guard let wait = finWait, wait.carrier == carrier else { return finWait = (carrier, now, 0) }
        let due = TimeAmount.nanoseconds(Self.acknowledgementSilence.nanoseconds << min(wait.copies, 4))
        guard now - wait.since >= due else { return }
        finWait = (carrier, now, wait.copies + 1)
        let targets = core.usableSubflows.filter { $0 != carrier }
        guard !targets.isEmpty else { return }
        for id in targets { records[id]?.handler.write(.dataFin(fin), flush: true) }
        logger.info("our DATA_FIN on subflow \(carrier) unacknowledged for \(due.nanoseconds / 1_000_000) ms: copied to subflow \(targets.map { "\($0)" }.joined(separator: ", "))")
    }

    /// Each subflow's transport state (TCP_INFO for TCP): to find stalls, and to size its queues;
    /// then whether anything is left to watch.
    private func checkStalls() {
        guard state == .open else { return stopLivenessChecks() }
        checkAcknowledgementProgress()
        checkFinAcknowledgement(now: .now())
        let wrote = wroteSinceLivenessCheck
        wroteSinceLivenessCheck = false
        var inFlight = false
        var asked: [(SubflowID, EventLoopFuture<SubflowProgress>)] = []
        for (id, record) in records where record.established && !record.closed {
            // UDP knows its state at once: no future, no closure (10,000 sessions check 20 times a second).
            if let progress = record.handler.currentProgress {
                inFlight = inFlight || progress.inFlight
                observed(id, progress)
            } else if let progress = record.handler.progress() {
                asked.append((id, progress))
            }
        }
        guard !asked.isEmpty else { return checkFinished(wrote: wrote, inFlight: inFlight) }
        let bound = self.bound
        var pending = asked.count
        for (id, progress) in asked {
            progress.assumeIsolated().whenComplete { result in
                let engine = bound.value
                if case .success(let progress) = result {
                    inFlight = inFlight || progress.inFlight
                    engine.observed(id, progress)
                }
                pending -= 1
                if pending == 0 { engine.checkFinished(wrote: wrote, inFlight: inFlight) }
            }
        }
    }

    /// Every subflow answered: the checks stop when there is nothing left to watch, and slow down
    /// when no session data is.
    private func checkFinished(wrote: Bool, inFlight: Bool) {
        guard state == .open, core.unacknowledgedBytes == 0 else { return }
        guard !wrote, !inFlight, !wroteSinceLivenessCheck, suspendedSince.isEmpty, core.unacknowledgedFin == nil else {
            if livenessTicker?.interval != idleLivenessInterval { runLivenessChecks(every: idleLivenessInterval) }
            return
        }
        stopLivenessChecks()
    }

    private func observed(_ id: SubflowID, _ progress: SubflowProgress) {
        if progress.rttMs > 0 { core.recordRTT(id, milliseconds: progress.currentRttMs) }
        if let acked = progress.bytesAcked {
            records[id]?.deliveryRate.observe(bytesAcked: acked, at: NIODeadline.now().uptimeNanoseconds)
        }
        stallCheck(id, progress)
        resizeQueues(id, progress)
    }

    var livenessIntervalForTesting: TimeAmount? { livenessTicker?.interval }
    func startLivenessChecksForTesting() { startLivenessChecks() }
    func probeRoundForTesting() -> Int { sendProbes() }

    /// A blackhole sends no netlink event: the subflow's TCP just stops getting ACKs, and the kernel
    /// retransmits on its RTO. Data in flight, at least one RTO retransmission and no ACK for
    /// max(minimumStallTimeout, 2 RTT) suspends the subflow: its data goes elsewhere at once
    /// (MPTCP reinjects on a subflow RTO too). An ACK after that resumes it; none within
    /// `stallRetirement` retires it. Requiring the retransmission keeps an idle subflow that just
    /// sent a probe from looking stalled.
    ///
    /// For a UDP subflow, time this event loop was blocked or behind (`LoopLag`: its timers ran
    /// late), or the listener's socket this subflow reads through had more waiting than its reads
    /// took (`readBacklog`), does not count as silence or as time suspended: acknowledgements that
    /// arrived meanwhile sat unread in the socket. With 10,000 UDP sessions on one loop, a loop
    /// blocked for a second made every subflow with a probe in flight look stalled, and the
    /// retirements and rejoins that followed blocked it longer. TCP's silence is the kernel's
    /// (`SubflowProgress.lagToDiscount`).
    func stallCheck(_ id: SubflowID, _ tcp: SubflowProgress) {
        guard state == .open, let record = records[id], record.established, !record.closed else { return }
        let lag = tcp.lagToDiscount(loop: LoopLag.current, socketBacklog: record.handler.readBacklog)
        let floor = options.minimumStallTimeout.nanoseconds / 1_000_000
        let limitMs = max(floor, 2 * tcp.rttMs)
        let now = NIODeadline.now()
        if tcp.lossRecovery { lossRecoverySince[id] = lossRecoverySince[id] ?? now } else { lossRecoverySince[id] = nil }
        let peerCount = core.send.peerReceived(on: id)
        if peerCountSince[id]?.count != peerCount { peerCountSince[id] = (peerCount, now) }
        // Repairing a loss, and the peer got nothing more on this subflow meanwhile: the loss is
        // the first thing the peer lacks there. A long recovery that keeps delivering is not.
        let recoveringMs = lossRecoverySince[id].map { since in
            (now - max(since, peerCountSince[id]?.since ?? since)).nanoseconds / 1_000_000
        }
        if core.isSuspended(id) {
            guard let since = suspendedSince[id] else { return }
            let suspendedMs = (now - since).nanoseconds / 1_000_000
            if tcp.silentMs < suspendedMs {
                suspendedSince[id] = nil
                core.resumeSubflow(id)
                logger.info("subflow \(id) recovered: acknowledged again")
                pump()
            } else if Int64(now.uptimeNanoseconds - since.uptimeNanoseconds)
                        - Int64(lag.blocked(from: since.uptimeNanoseconds, to: now.uptimeNanoseconds)) > options.stallRetirement.nanoseconds {
                retire(id, reason: "no acknowledgement for \(tcp.silentMs) ms")
            }
        } else if tcp.looksStalled(limitMs: limitMs, lag: lag, now: now.uptimeNanoseconds) {
            suspendedSince[id] = now
            let bytes = core.suspendSubflow(id)
            let lagMs = tcp.silentMs - lag.discounted(silentMs: tcp.silentMs, now: now.uptimeNanoseconds)
            logger.info("subflow \(id) stalled: no acknowledgement for \(tcp.silentMs) ms after a timeout (\(lagMs) ms of it the loop's lag); reinjecting \(bytes) bytes")
            eventContinuation.yield(.subflowStalled(info(id), silentMilliseconds: Int(tcp.silentMs)))
            if bytes > 0 { eventContinuation.yield(.reinjected(bytes: bytes, from: id.rawValue)) }
            // An idle session's probes may be backed off to 32 s, past the retirement: probe soon.
            probeDelay = options.probeInterval
            probeTimer.armIfEarlier(at: now + options.probeInterval)
            // Its siblings run between the same two interfaces, most likely through whatever just
            // failed silently: taking over with nothing in flight, a sibling would only be found
            // dead one RTO later, with the data it took (a blackhole doubled its stall). They carry
            // nothing until they are acknowledged again, which their next PROBE shows.
            for sibling in core.siblings(of: id) {
                suspendedSince[sibling] = now
                let moved = core.suspendSubflow(sibling)
                logger.info("subflow \(sibling) suspended with its sibling \(id): same pair of interfaces")
                if moved > 0 { eventContinuation.yield(.reinjected(bytes: moved, from: sibling.rawValue)) }
            }
            pump()
        } else if tcp.headOfLineOverdue(recoveringMs: recoveringMs) {
            // A drain is worth waiting for only while it moves: a cross pair over a link that had
            // just come back went silent for 744 ms while draining, with the receiver's next bytes.
            if draining[id] != nil {
                logger.info("subflow \(id) silent \(tcp.silentMs) ms while draining: what it carries goes again elsewhere")
                endDrain(id)
            } else {
                copyHeadOfLine(from: id, silentMs: tcp.silentMs, recoveringMs: recoveringMs)
            }
        }
    }

    /// The subflow that carries what the peer waits for first went silent with it in flight
    /// (`SubflowProgress.headOfLineOverdue`): a copy goes now on another subflow, one of another
    /// pair of interfaces if there is one, and the peer keeps whichever arrives first. Never from a
    /// regular subflow onto a backup: under `handover` the standby path carries nothing while the
    /// primary works (it may be metered), and a primary's tail losses are no failure. At 10 Mbit/s
    /// four such copies put 12 % of the bytes on the standby before any fault (CI at f481cd3).
    /// The subflow keeps its data and goes on; if it was the path that failed, its stall check
    /// follows. Once per head: a copy that does not get through waits for that check, as
    /// everything did before. Worth it where a path fails again and again or silently (flapping,
    /// blackhole: BENCHMARKS.md), where a timeout would otherwise end each stall.
    private func copyHeadOfLine(from id: SubflowID, silentMs: Int64, recoveringMs: Int64?) {
        let copies = core.send.headOfLine(on: id, maxBytes: Self.headOfLineCopyLimit)
        guard let head = copies.first?.sequence, head != copiedHeadOfLine else { return }
        let siblings = core.siblings(of: id)
        // The core holds a subflow from its establishment until it is gone: usable ones are open.
        let fromBackup = core.isBackup(id)
        let others = core.usableSubflows.filter { $0 != id && (fromBackup || !core.isBackup($0)) }
        guard let target = others.min(by: { !siblings.contains($0) && siblings.contains($1) }),
              let handler = records[target]?.handler else { return }
        copiedHeadOfLine = head
        for copy in copies { handler.writeData(sequence: copy.sequence, payload: copy.payload) }
        handler.flush()
        let bytes = copies.reduce(0) { $0 + $1.payload.readableBytes }
        let unreported = core.send.sentBytes(on: target) - core.send.peerReceived(on: target)
        core.noteCopies(bytes, on: target)
        headOfLineCopiedBytes += bytes
        let why = silentMs >= SubflowProgress.headOfLineSilenceMs ? "silent \(silentMs) ms" : "repairing a loss for \(recoveringMs ?? 0) ms"
        logger.info("subflow \(id) \(why) with the data the peer waits for: \(bytes) bytes of it copied to subflow \(target), which had \(unreported) bytes unreported")
    }

    /// About one segment's worth of a fast path, a few of a slow one's: what a tail loss takes.
    static let headOfLineCopyLimit = 64 * 1024

    /// Each subflow queues about `queueTarget` of its own rate beyond what TCP has in flight:
    /// enough to keep a fast path busy, little enough that data stranded on a path that dies, and
    /// the queue that reinjected data waits behind on a slow survivor, stay small. A TCP subflow
    /// keeps its first queue (`SubflowConnector.writeWaterMark`) until it has a delivery rate.
    private func resizeQueues(_ id: SubflowID, _ progress: SubflowProgress) {
        guard let record = records[id], !record.closed else { return }
        let rate = progress.bytesAcked == nil ? progress.bytesPerSecond : record.deliveryRate.bytesPerSecond
        guard let rate, rate > 0 else { return }
        let target = Int(rate * options.queueTarget.seconds)
        let high = max(8 * 1024, min(1 << 20, Int(UInt(max(target, 1)).roundedUpToPowerOfTwo)))
        // A UDP subflow's datagrams grow as its path MTU search confirms larger ones.
        let sizing = QueueSizing(highWaterMark: high, maxDataPayload: record.handler.maxDataPayload)
        guard queueSizing[id] != sizing else { return }
        queueSizing[id] = sizing
        core.setSegmentLimit(id, min(max(Self.minimumSegment, high / Self.segmentsPerQueue), sizing.maxDataPayload ?? .max))
        record.handler.setQueueLimit(high)
    }

    /// A UDP receiver takes a DATA frame only whole (one datagram): a quarter of the queue (2.5 ms
    /// of the path's rate at the default `queueTarget`) is what one late segment holds up. 64 KiB,
    /// the most a frame carries, is 52 ms of a 10 Mbit/s path. (Over TCP a frame's bytes are handed
    /// on as they arrive, `FrameDecoder.streamsData`; the same size keeps reinjection fine-grained.)
    static let segmentsPerQueue = 4
    static let minimumSegment = 4 * 1024

    /// A frame is a slice of the read it came in, and a read buffer grows to 1 MiB: a small frame
    /// held until the application reads it would keep all of it. Copied, it costs its own size.
    /// With 4 KiB segments and no copy the soak's RSS doubled (238 against 122 MB, one seed; 105
    /// with the copy). A 64 KiB frame, loopback's, is worth its share of a read and is not copied.
    static func unpinned(_ payload: ByteBuffer) -> ByteBuffer {
        guard payload.readableBytes <= copiedFrameLimit, payload.storageCapacity >= 8 * payload.readableBytes else { return payload }
        var copy = ByteBufferAllocator().buffer(capacity: payload.readableBytes)
        copy.writeImmutableBuffer(payload)
        return copy
    }

    static let copiedFrameLimit = 16 * 1024

    // MARK: SubflowDelegate

    func subflow(_ handler: any SubflowTransport, received frame: Frame) {
        if !droppedFrameTypesForTesting.isEmpty, droppedFrameTypesForTesting.contains(frame.type) { return }
        let id = handler.id
        // In place: a copy out and back retains and releases the record's handler, addresses and
        // strings for every frame.
        guard let action = records[id]?.machine.receive(frame) else { return }
        switch action {
        case .ignore:
            break
        case .handshake(let frame):
            handleJoinAck(id, frame)
        case .session(let frame):
            handleSessionFrame(id, frame)
        case .peerClosed(let close):
            guard signals.accept(.close(close)) else {
                retire(id, reason: "unauthenticated CLOSE", abort: .authenticationFailed)
                return
            }
            // The peer finished; its TCP FIN follows. Its CLOSE also stands for the ack of our
            // DATA_FIN, should that have been lost.
            if core.receivePeerClose() != .none { pump() }
        case .peerAborted(let close):
            let established = records[id]?.established ?? false
            if established ? signals.accept(.abort(close)) : true {
                if established {
                    fail(.abortedByPeer(reason: close.reason, message: close.message), notifyPeer: nil)
                } else {
                    retire(id, reason: "JOIN refused: \(close.reason) \(close.message)")
                    retryRefusedJoin(close.reason)
                }
            } else {
                rejectedSignals += 1
                logger.warning("dropped an ABORT that failed authentication")
            }
        case .protocolViolation(let why):
            retire(id, reason: why, abort: .protocolViolation)
        }
    }

    /// The replaced subflow is reset rather than closed: its FIN would reach the listener only after
    /// everything queued on it, and until then the listener refuses the new JOIN at its limit.
    /// The subflow to be replaced first drains (`SessionCore.drainSubflow`): it takes no new data,
    /// and goes once the peer has what it carries, or after `drainLimit`. Then its replacement is
    /// joined, as the peer refuses a JOIN beyond its subflow limit. It is reset rather than closed:
    /// after a drain that ran out of time, a FIN would reach the peer only after whatever is still
    /// queued (0.5 s on a cross pair, and a link's return took up to 2.6 s to settle), a reset at once.
    private func replace(_ id: SubflowID, reason: String) {
        guard draining[id] == nil, records[id]?.closed == false else { return }
        draining[id] = reason
        core.drainSubflow(id)
        logger.info("subflow \(id) draining: \(reason)")
        LoopTimer.once(on: loop, owner: self, in: Self.drainLimit) { engine in engine.endDrain(id) }
        joinMissingPairs()
        schedulePump()
    }

    /// Long enough for a path's queue at a few Mbit/s; a drain that takes longer ends as a
    /// replacement did before draining: what the subflow still carries goes again elsewhere.
    static let drainLimit = TimeAmount.milliseconds(1500)

    /// The replacement is joined one of the replaced subflow's RTTs after its reset: the reset
    /// crosses that subflow's path, queue included, and a JOIN sent at once over a shorter path
    /// got to the peer first, was refused at its subflow limit, and waited 400 ms for its retry
    /// (a link's return: the cross pair's reset took 27 ms over the other path's queue).
    private func endDrain(_ id: SubflowID) {
        guard let reason = draining.removeValue(forKey: id) else { return }
        if !core.isDrained(id) { drainsCutShort += 1 }
        let resetCrossing = TimeAmount.microseconds(Int64(min(core.smoothedRTT(id) ?? 0, Self.joinDelayLimitMs) * 1000))
        retire(id, reason: reason, reset: true)
        LoopTimer.once(on: loop, owner: self, in: resetCrossing) { $0.joinMissingPairs() }
    }

    static let joinDelayLimitMs = 250.0

    private func endFinishedDrains() {
        for id in draining.keys.sorted() where core.isDrained(id) || records[id]?.closed != false { endDrain(id) }
    }

    /// A JOIN that replaces a subflow can reach the listener before the close of the one it
    /// replaces, and be refused for the subflow limit: try the mesh again shortly, a few times.
    private func retryRefusedJoin(_ reason: CloseReason) {
        guard reason == .tooManySubflows, refusedJoinRetries < 5 else { return }
        refusedJoinRetries += 1
        let bound = self.bound
        loop.scheduleTask(in: .milliseconds(200 << refusedJoinRetries)) { bound.value.joinMissingPairs() }
    }

    private func handleJoinAck(_ id: SubflowID, _ frame: Frame) {
        guard case .joinAck(let ack) = frame, var record = records[id], let join = record.pendingJoin else {
            retire(id, reason: "unexpected handshake frame", abort: .protocolViolation)
            return
        }
        guard joins.verify(ack, for: join) else {
            retire(id, reason: "JOIN_ACK failed authentication", abort: .authenticationFailed)
            return
        }
        record.pendingJoin = nil
        installKeys(on: record.handler)
        record.machine.handshakeCompleted()
        record.established = true
        records[id] = record
        let rtt = record.handler.handshakeSentAt.map { Double((NIODeadline.now() - $0).nanoseconds) / 1e6 }
        subflowEstablished(id, backup: record.backup, rttSample: rtt)
        refusedJoinRetries = 0
        // Addresses learnt while this JOIN was in flight may call for a better mesh now.
        joinMissingPairs()
    }

    private func handleSessionFrame(_ id: SubflowID, _ frame: Frame) {
        do {
            let outcome: SessionCore.Outcome
            switch frame {
            case .data(var data):
                data.payload = Self.unpinned(data.payload)
                outcome = try core.receiveData(data, on: id)
            case .dataAck(let ack):
                outcome = try core.receiveAck(ack, on: id)
            case .dataFin(let fin):
                outcome = try core.receiveFin(fin)
            case .probe(let probe):
                records[id]?.handler.write(.probeAck(probe))
                return
            case .probeAck(let probe):
                let now = NIODeadline.now().uptimeNanoseconds
                if probe.identifier <= now { core.recordRTT(id, milliseconds: Double(now - probe.identifier) / 1e6) }
                return
            case .addAddress, .removeAddress, .priority:
                handleSignal(id, frame)
                return
            case .interface(let hint):
                records[id]?.peerInterface = hint.tag
                updatePathGroup(id)
                schedulePump()
                return
            default:
                retire(id, reason: "\(frame.type) not allowed here", abort: .protocolViolation)
                return
            }
            switch outcome {
            case .none: break
            case .dataReadable:
                // A waiting reader is answered once per pass of the loop, not per frame: the frames
                // of a read batch (and the pieces of a streamed frame) reach it in one hop.
                pump(servingReaders: false)
                schedulePump()
            default: pump()
            }
        } catch {
            fail(.protocolViolation(error.description), notifyPeer: .protocolViolation)
        }
    }

    private func handleSignal(_ id: SubflowID, _ frame: Frame) {
        guard signals.accept(frame) else {
            rejectedSignals += 1
            logger.warning("dropped a \(frame.type) that failed authentication (\(signals.rejected) so far)")
            return
        }
        switch frame {
        case .addAddress(let add):
            guard let announced = SocketAddress(add.address) else { return }
            let address = announced.port == 0 ? announced.withPort(port) : announced
            eventContinuation.yield(.addressAnnounced(address))
            learnPeerAddresses([address])
        case .removeAddress(let remove):
            guard let address = SocketAddress(remove.address) else { return }
            eventContinuation.yield(.addressRemoved(address))
            peerAddresses.removeAll { $0.hostString == address.hostString }
            for (sid, record) in records where !record.closed && record.remote.hostString == address.hostString {
                retire(sid, reason: "peer removed \(address.hostString)")
            }
        case .priority(let prio):
            records[id]?.backup = prio.backup
            core.setBackup(id, prio.backup)
            pump()
        default:
            break
        }
    }

    /// The pump (and its flushes) runs in a task of its own rather than inside channelReadComplete:
    /// a flush there can fail on a reset socket, and NIO then closes the channel while it is still
    /// handling an end of input, which trips its `isRegisteredFully` assertion in debug builds.
    /// Found by the soak scenario. Read batches of several subflows share one pass.
    func subflowReadComplete(_ handler: any SubflowTransport) {
        core.readBatchComplete()
        schedulePump()
    }

    private func schedulePump() {
        guard !pumpScheduled else { return }
        pumpScheduled = true
        let bound = self.bound
        loop.execute {
            bound.value.pumpScheduled = false
            bound.value.pump()
        }
    }

    func subflowSent(_ handler: any SubflowTransport) {
        records[handler.id]?.wroteSinceProbeRound = true
        wroteSinceLivenessCheck = true
        startLivenessChecks()
    }

    func subflowWritabilityChanged(_ handler: any SubflowTransport, writable: Bool) {
        core.setWritable(handler.id, writable)
        if writable { pump() }
    }

    func subflowInputClosed(_ handler: any SubflowTransport) {
        // The peer closed its side of this subflow. While the session is closing that is the
        // normal end; otherwise the subflow is lost.
        if state == .closing || state == .closed {
            handler.writeAndClose(nil)
        } else {
            retire(handler.id, reason: "peer closed the connection")
        }
    }

    func subflowClosed(_ handler: any SubflowTransport, error: (any Error)?) {
        subflowGone(handler.id, reason: error.map { "\($0)" } ?? "connection closed")
    }

    /// The session, not the subflow, resends what a UDP subflow lost: on whichever subflow the
    /// scheduler picks, so a lossy path does not hold the data it lost.
    func subflow(_ handler: any SubflowTransport, lostDataAt sequence: UInt64, length: Int) {
        guard records[handler.id]?.closed == false, core.dataLost(sequence: sequence, length: length, on: handler.id) > 0 else { return }
        schedulePump()
    }

    func subflow(_ handler: any SubflowTransport, peerMovedFrom old: SocketAddress, to new: SocketAddress) {
        guard records[handler.id] != nil else { return }
        records[handler.id]!.remote = new.unmapped
        logger.info("subflow \(handler.id): the peer now sends from \(new) (was \(old)), path checked")
        eventContinuation.yield(.subflowRebound(info(handler.id), from: old.unmapped))
    }

    // MARK: the pump: perform what the core decides

    /// Runs `body` with the pump held, then pumps once.
    private func withPumpHeld(_ body: () -> Void) {
        let held = pumping
        pumping = true
        body()
        pumping = held
        if !held { pump() }
    }

    func pump(servingReaders: Bool = true) {
        guard !pumping else { return }
        if !draining.isEmpty { endFinishedDrains() }
        pumping = true
        defer { pumping = false }
        acceptQueuedWrites()
        if state == .open || state == .closing {
            var touched: Set<SubflowID> = []
            while let transmission = core.nextTransmission() {
                let id = transmission.subflow
                guard let handler = records[id]?.handler else { continue }
                switch transmission {
                case .data(_, let sequence, let payload, _):
                    handler.writeData(sequence: sequence, payload: payload)
                    if !handler.isWritable { core.setWritable(id, false) }
                case .dataAck(_, let ack):
                    handler.write(.dataAck(ack), flush: false)
                case .dataFin(_, let fin):
                    handler.write(.dataFin(fin), flush: false)
                }
                touched.insert(id)
            }
            for id in touched { records[id]?.handler.flush() }
            if !touched.isEmpty { transmissions &+= 1 }
        }
        if servingReaders { serveReaders() }
        if state == .open, core.isTransportFinished { beginClosing() }
    }

    private func serveReaders() {
        while let waiter = readWaiters.first {
            if let segments = core.readSegments(maxBytes: waiter.maxBytes) {
                readWaiters.removeFirst()
                waiter.wait.answer(.success(segments))
            } else if core.isReadFinished {
                readWaiters.removeFirst()
                waiter.wait.answer(.success(nil))
            } else if case .failed(let error) = state {
                readWaiters.removeFirst()
                waiter.wait.answer(.failure(error))
            } else {
                break
            }
        }
    }

    private func acceptQueuedWrites() {
        while var waiter = writeWaiters.first, core.writableSpace > 0 {
            let space = core.writableSpace
            if waiter.bytes.readableBytes <= space {
                core.write(waiter.bytes)
                writeWaiters.removeFirst()
                waiter.wait.answer(.success(()))
            } else {
                core.write(waiter.bytes.readSlice(length: space)!)
                writeWaiters[writeWaiters.startIndex] = waiter
            }
        }
        if finishRequested, writeWaiters.isEmpty { core.finish() }
    }

    // MARK: application calls (on the loop)

    func read(maxBytes: Int, for wait: LoopWait<[ByteBuffer]?>) {
        guard !wait.cancelled else { return }
        readWaiters.append((maxBytes, wait))
        let hadData = core.readableBytes > 0
        serveReaders()
        if hadData { pump() }  // reading may have re-opened the window
    }

    func cancelRead(_ wait: LoopWait<[ByteBuffer]?>) {
        if wait.cancel() { readWaiters.removeAll { $0.wait === wait } }
    }

    func write(_ bytes: ByteBuffer, for wait: LoopWait<Void>) {
        guard !wait.cancelled else { return }
        if case .failed(let error) = state { return wait.answer(.failure(error)) }
        guard state == .open, !finishRequested else { return wait.answer(.failure(NBSError.writeAfterFinish)) }
        writeWaiters.append((bytes, bytes.readableBytes, wait))
        pump()
    }

    /// A write none of whose bytes were taken is withdrawn. One taken in part keeps its place and
    /// returns now: its rest goes out as space opens, so the stream never has a hole, and that rest
    /// is memory the write held already.
    func cancelWrite(_ wait: LoopWait<Void>) {
        guard let waiter = writeWaiters.first(where: { $0.wait === wait }) else { return _ = wait.cancel() }
        if waiter.bytes.readableBytes == waiter.size {
            if wait.cancel() { writeWaiters.removeAll { $0.wait === wait } }
        } else {
            wait.answer(.success(()))
        }
    }

    func finish() {
        guard state == .open else { return }
        finishRequested = true
        pump()
    }

    /// Begins the graceful close even for a caller already cancelled: only its wait is cancelled.
    func close(for wait: LoopWait<Void>) {
        switch state {
        case .closed: return wait.answer(.success(()))
        case .failed(let error): return wait.answer(.failure(error))
        default: break
        }
        if !wait.cancelled { closeWaiters.append(wait) }
        finish()
        LoopTimer.once(on: loop, owner: self, in: options.closeTimeout) { engine in
            guard engine.state == .open || engine.state == .closing else { return }
            if engine.state == .open, engine.core.concludeWithoutFinalAck() {
                engine.logger.info("no acknowledgement of our DATA_FIN within the close timeout; every byte was delivered both ways: closing")
                engine.pump()
            } else {
                engine.fail(.closeTimedOut, notifyPeer: .timeout)
            }
        }
    }

    func cancelClose(_ wait: LoopWait<Void>) {
        if wait.cancel() { closeWaiters.removeAll { $0 === wait } }
    }

    func abort(reason: CloseReason, message: String) {
        fail(.aborted(reason: reason, message: message), notifyPeer: reason)
    }

    // MARK: endings

    private func beginClosing() {
        state = .closing
        probeTimer.stop()
        for (_, record) in records where !record.closed && record.established {
            record.handler.write(signals.close(.normal, "", abort: false), flush: false)
            record.handler.shutdownOutput()
        }
        for (id, record) in records where !record.closed && !record.established {
            record.handler.writeAndClose(nil)
            records[id]!.closed = true
        }
        // Subflows whose peer never closes its side are closed after a short linger.
        lingerTimer.arm(in: .seconds(2))
        checkClosingDone()
    }

    private func lingerEnded() {
        for record in records.values where !record.closed { record.handler.writeAndClose(nil) }
    }

    private func checkClosingDone() {
        guard state == .closing, records.values.allSatisfy(\.closed) else { return }
        lingerTimer.stop()
        state = .closed
        for waiter in closeWaiters { waiter.answer(.success(())) }
        closeWaiters.removeAll()
        serveReaders()
        eventContinuation.yield(.closed)
        eventContinuation.finish()
        terminated()
    }

    private func terminated() {
        graceTimer.stop()
        rejoinTimer.stop()
        probeTimer.stop()
        lingerTimer.stop()
        stopLivenessChecks()
        interfaceFeed?.cancel()
        interfaceFeed = nil
        onTerminate?()
        onTerminate = nil
        // Closed subflows no longer report; dropping the delegate breaks the handler ↔ engine cycle.
        for record in records.values where record.closed { record.handler.delegate = nil }
    }

    func fail(_ error: NBSError, notifyPeer reason: CloseReason?) {
        guard state == .open || state == .closing else { return }
        // The application's own abort is its choice, not news for its operator.
        if case .aborted = error { logger.debug("\(error)") } else { logger.info("session failed: \(error)") }
        state = .failed(error)
        probeTimer.stop()
        lingerTimer.stop()
        for (id, record) in records where !record.closed {
            let frame = reason.map { abortFrame(for: record, $0, error.description) }
            record.handler.writeAndClose(frame)
            records[id]!.closed = true
            records[id]!.closeReason = error.description
            core.removeSubflow(id)
        }
        for waiter in readWaiters { waiter.wait.answer(.failure(error)) }
        readWaiters.removeAll()
        for waiter in writeWaiters { waiter.wait.answer(.failure(error)) }
        writeWaiters.removeAll()
        for waiter in closeWaiters { waiter.answer(.failure(error)) }
        closeWaiters.removeAll()
        eventContinuation.yield(.failed(error))
        eventContinuation.finish()
        terminated()
    }

    // MARK: liveness and statistics

    private func startProbingIfNeeded() {
        guard !probeTimer.isArmed, probeDelay == .zero else { return }
        probeDelay = options.probeInterval
        probeTimer.arm(in: probeDelay)
    }

    /// An idle session probes less: each round after which nothing else was sent or received doubles
    /// the interval, up to `idleProbeBackoff` times `probeInterval`; a round with traffic goes back to
    /// `probeInterval`. Each probe, and each answer to one, starts the stall checks for a round or two
    /// (`startLivenessChecks`), so probes are what an idle session costs (BENCHMARKS.md, Scale), and
    /// the cap is how long a path that died while idle can go unnoticed. While data moves, RTT comes
    /// from TCP_INFO (`checkStalls`) rather than probes.
    private func probesDue() {
        guard state == .open else { return }
        sendProbes()
        // Not idle while a subflow is suspended: its next acknowledgement, which a probe asks for,
        // is what resumes it before `stallRetirement` retires it.
        let idle = transmissions == transmissionsAtProbe && suspendedSince.isEmpty
        transmissionsAtProbe = transmissions
        let longest = options.probeInterval.nanoseconds * Self.idleProbeBackoff
        probeDelay = idle ? .nanoseconds(min(probeDelay.nanoseconds * 2, longest)) : options.probeInterval
        // Backed-off rounds of a loop's idle sessions come together (`LoopTimer.arm(in:slack:)`).
        if idle { probeTimer.arm(in: probeDelay, slack: LoopTimer.idleGrain) } else { probeTimer.arm(in: probeDelay) }
    }

    static let idleProbeBackoff: Int64 = 32

    /// A PROBE round at once, and rounds at the normal pace after it.
    private func probeNow() {
        probeDelay = options.probeInterval
        probeTimer.armIfEarlier(at: .now())
    }

    /// A subflow that sent anything since the last round is skipped: whatever it sent (data, an
    /// acknowledgement, the answer to the peer's PROBE, a UDP keepalive) is watched until the
    /// transport acknowledges it, as the PROBE would be, so it has tested the path already. Only
    /// subflows that sent nothing, such as a standby sibling while data moves, need the PROBE.
    /// Both ends back off alike, so on an idle session one end's rounds soon answer for the
    /// other's; and when 10,000 sessions closed at once, each probed both subflows every second
    /// (a round with traffic is not idle) while their closes queued behind (BENCHMARKS.md, Scale).
    /// Skipped subflows give no RTT sample; TCP_INFO and UDP's acknowledgements give theirs.
    /// Returns how many PROBEs went out.
    @discardableResult
    private func sendProbes() -> Int {
        guard state == .open else { return 0 }
        let now = NIODeadline.now().uptimeNanoseconds
        var sent = 0
        for (id, record) in records where record.established && !record.closed {
            if !record.wroteSinceProbeRound {
                record.handler.write(.probe(.init(identifier: now)))
                sent += 1
            }
            records[id]?.wroteSinceProbeRound = false
        }
        return sent
    }

    func info(_ id: SubflowID) -> SubflowInfo {
        let record = records[id]!
        let stats = core.stats(id) ?? .init()
        let state: SubflowState = record.closed ? .closed : !record.established ? .connecting
            : core.isSuspended(id) ? .stalled : core.isDraining(id) ? .draining : record.backup ? .backup : core.isStandby(id) ? .standby : .active
        return SubflowInfo(id: id.rawValue, local: record.local, remote: record.remote, interface: record.interface, state: state,
                           rttMilliseconds: core.smoothedRTT(id), bytesSent: stats.bytesSent, bytesReceived: stats.bytesReceived,
                           reinjectedBytes: stats.reinjectedBytes, closeReason: record.closeReason,
                           datagramSize: record.handler.datagramSize)
    }

    var subflowInfos: [SubflowInfo] { records.keys.sorted().map(info) }
}

extension SessionEngine {
    func handlerForTesting(_ raw: UInt32) -> (any SubflowTransport)? { records[SubflowID(raw)]?.handler }
    var liveTransportsForTesting: [any SubflowTransport] { records.values.filter { !$0.closed }.map(\.handler) }
    var waitingReadsForTesting: Int { readWaiters.count }

    /// Test hook: retire the live subflow with the most data in flight, now; returns the bytes
    /// that were queued for reinjection (0, and nothing retired, when none has data in flight).
    func retireBusiestSubflowForTesting() -> Int {
        guard let (id, _) = busiest(among: core.aliveSubflows) else { return 0 }
        let before = core.reinjectedBytes + core.send.pendingReinjectionBytes
        retire(id, reason: "reset by test", abort: nil)
        return core.reinjectedBytes + core.send.pendingReinjectionBytes - before
    }

    /// Test hook: replace the live subflow with the most data in flight, as a better pair would
    /// (`replace`); returns its bytes in flight (0, and nothing replaced, when none has any).
    func replaceBusiestSubflowForTesting() -> Int {
        guard let (id, bytes) = busiest(among: core.usableSubflows) else { return 0 }
        replace(id, reason: "replaced by test")
        return bytes
    }

    /// The subflow of `ids` with the most data in flight, and how much; nil when none has any.
    private func busiest(among ids: [SubflowID]) -> (SubflowID, Int)? {
        guard let top = ids.map({ ($0, core.send.inFlightBytes(on: $0)) }).max(by: { $0.1 < $1.1 }), top.1 > 0 else { return nil }
        return top
    }

    /// Test hook: make a subflow die as a network failure would, with a TCP reset.
    func killSubflow(_ raw: UInt32) {
        guard let record = records[SubflowID(raw)], !record.closed else { return }
        record.handler.resetAndClose()
    }
}

/// What the engine learns of a subflow's path from its transport: TCP_INFO for TCP, the loss
/// recovery's own state for UDP. The same stall rules apply to both.
struct SubflowProgress {
    var inFlight: Bool
    /// Milliseconds since the last acknowledgement.
    var silentMs: Int64
    var rttMsPrecise: Double
    var rttMs: Int64 { Int64(rttMsPrecise) }
    /// Consecutive timeouts (RTO retransmissions, probe timeouts) without an acknowledgement.
    var timeoutRetransmissions: Int
    /// Window / RTT: what the path carries when the window is full; UDP's queues are sized by it.
    var bytesPerSecond: Double
    /// TCP's running count of acknowledged bytes, whose growth sizes a TCP subflow's queues (see
    /// `DeliveryRate`); nil for UDP, and where the kernel does not report it.
    var bytesAcked: UInt64?
    /// The silence is the kernel's own count (TCP's tcpi_last_ack_recv), which a late event loop
    /// does not lengthen; a UDP subflow's counts from when the loop read the acknowledgement.
    var silenceClockedByKernel: Bool
    /// TCP is repairing a loss: fast recovery, or after a timeout (tcpi_ca_state Recovery or Loss).
    var lossRecovery: Bool
    /// The path's round trip without our own queue in it (tcpi_min_rtt); nil where unknown.
    var baseRttMs: Double?

    /// What a segment sent now would take: with nothing in flight our queue has drained, and the
    /// last RTT measured (a full queue's, say) is stale until the next ACK. Fed as such, it kept a
    /// 5 Mbit/s path whose RTT had reached 69 ms (tbf's 50 ms queue) out of `aggregate` as far
    /// slower than the 20 Mbit/s one (`SessionCore.scheduledSubflow`) long after the queue had
    /// drained: it carried 1.7 MB of 16 MiB instead of 3.4, and the transfer ran at 78-82 % of the sum.
    var currentRttMs: Double { inFlight ? rttMsPrecise : baseRttMs.map { min($0, rttMsPrecise) } ?? rttMsPrecise }

    init(inFlight: Bool, silentMs: Int64, rttMs: Double, timeoutRetransmissions: Int, bytesPerSecond: Double, bytesAcked: UInt64? = nil,
         silenceClockedByKernel: Bool = false, lossRecovery: Bool = false, baseRttMs: Double? = nil) {
        self.inFlight = inFlight
        self.silentMs = silentMs
        self.rttMsPrecise = rttMs
        self.timeoutRetransmissions = timeoutRetransmissions
        self.bytesPerSecond = bytesPerSecond
        self.bytesAcked = bytesAcked
        self.silenceClockedByKernel = silenceClockedByKernel
        self.lossRecovery = lossRecovery
        self.baseRttMs = baseRttMs
    }

    /// What a stall check may discount from this silence: the time the loop was behind (its own
    /// timers' lateness, and the backlog of the socket the subflow reads through), during which an
    /// acknowledgement could have waited unread; nothing for a silence the kernel clocks. On a busy
    /// loop, timers late by 20 ms and more again and again merge into lag that covers most of a
    /// silence (2.4 s of 2.9 s in a loaded test run): for TCP that hid what the kernel already knew.
    func lagToDiscount(loop: LoopLag, socketBacklog: LoopLag?) -> LoopLag {
        if silenceClockedByKernel { return LoopLag() }
        return socketBacklog.map { loop.merging($0) } ?? loop
    }

    /// Data in flight and no acknowledgement for a round trip and at least `headOfLineSilenceMs`.
    /// A TCP subflow that is sending gets acknowledgements every few milliseconds, even behind a
    /// full queue, and one that lost segments with SACK still gets duplicate ones: this silence is a
    /// loss at the tail of what it sent, which only its retransmission timeout (200 ms and more)
    /// would repair. Or TCP has been repairing a loss (`lossRecovery`) for as long while the peer
    /// reported nothing more received on the subflow, `recoveringMs` as the engine saw it: a fast
    /// retransmission takes about a round trip, so one that takes longer was most likely lost too,
    /// and only the timeout ends that either (traced link-down trials: the survivor's head sent
    /// again after 250-570 ms while SACKs kept coming). Without the peer's count, a recovery that
    /// lasts through a run of tbf drops but delivers all along had its head copied every 50 ms.
    /// Kernel-clocked only: a UDP subflow resends through the session itself.
    func headOfLineOverdue(recoveringMs: Int64?) -> Bool {
        guard silenceClockedByKernel, inFlight else { return false }
        let limit = max(Self.headOfLineSilenceMs, rttMs)
        return silentMs >= limit || (lossRecovery && (recoveringMs ?? 0) >= limit)
    }

    static let headOfLineSilenceMs: Int64 = 40
    /// linux/tcp.h: TCP_CA_Recovery; TCP_CA_Loss (4) follows it.
    static let tcpCARecovery: UInt8 = 3

    /// Data in flight, a timeout without an acknowledgement since, and silence beyond `limitMs` that
    /// is not the event loop's own lag (see `SessionEngine.stallCheck`).
    func looksStalled(limitMs: Int64, lag: LoopLag, now: UInt64) -> Bool {
        inFlight && timeoutRetransmissions > 0 && silentMs > limitMs && lag.discounted(silentMs: silentMs, now: now) > limitMs
    }

    /// A peer that advertised a zero window is sent window probes instead of data: nothing is
    /// unacknowledged and nothing is retransmitted, so a path that dies then would never look
    /// stalled (a helper saw a subflow wedged so in the soak: persist timer, `retrans 0`). Two
    /// probes in a row without an answer (`tcpi_probes`; any ACK resets it) count as timeouts with
    /// data waiting; one may just be on its way, to a live peer that is slow to read.
    init(_ info: tcp_info, bytesAcked: UInt64? = nil, minRTT: UInt32 = 0) {
        let rtt = Double(max(info.tcpi_rtt, 1)) / 1e6
        let unansweredProbes = info.tcpi_probes >= 2 ? Int(info.tcpi_probes) : 0
        self.init(inFlight: info.tcpi_unacked > 0 || unansweredProbes > 0, silentMs: Int64(info.tcpi_last_ack_recv),
                  rttMs: Double(info.tcpi_rtt) / 1000,
                  timeoutRetransmissions: Int(info.tcpi_retransmits) + unansweredProbes,
                  bytesPerSecond: Double(info.tcpi_snd_cwnd) * Double(info.tcpi_snd_mss) / rtt,
                  bytesAcked: bytesAcked, silenceClockedByKernel: true, lossRecovery: info.tcpi_ca_state >= Self.tcpCARecovery,
                  baseRttMs: minRTT > 0 ? Double(minRTT) / 1000 : nil)
    }

    /// A kernel before 4.1 leaves tcpi_bytes_acked 0; one that counts starts at 1, for the SYN.
    init(_ info: KernelTCPInfo) {
        self.init(info.base, bytesAcked: info.bytesAcked > 0 ? info.bytesAcked : nil, minRTT: info.minRTT)
    }
}

extension TimeAmount {
    var seconds: Double { Double(nanoseconds) / 1e9 }
}

extension UInt {
    var roundedUpToPowerOfTwo: UInt { self <= 1 ? 1 : 1 << (UInt.bitWidth - (self - 1).leadingZeroBitCount) }
}
