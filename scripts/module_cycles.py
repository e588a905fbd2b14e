#!/usr/bin/env python3
"""Module cycles inside each crate of the workspace.

Reads every crate's `src/` (and `cli/*/src`), takes each file's non-test code, records
an edge from a module to every module it names through `crate::` or `super::`, and
prints the strongly connected components with more than one module (Tarjan).

    python3 scripts/module_cycles.py .      # "components with cycles: 0" when there are none
"""
import os,re,sys,itertools
root=sys.argv[1]
crates=[d for d in os.popen(f"cd {root} && ls -d */src cli/*/src").read().split()]
def modname(src,path):
    rel=os.path.relpath(path,src)[:-3]
    parts=rel.split('/')
    if parts[-1] in ('mod','lib','main'): parts=parts[:-1]
    return '::'.join(parts) or 'crate'
total=0
for c in crates:
    src=os.path.join(root,c)
    files=[os.path.join(dp,f) for dp,_,fs in os.walk(src) for f in fs if f.endswith('.rs')]
    mods={modname(src,f):f for f in files}
    g={m:set() for m in mods}
    for m,f in mods.items():
        text=open(f).read()
        # drop test modules
        text=re.split(r'#\[cfg\(test\)\]\s*(pub\(crate\)\s+)?mod \w+\s*\{',text)[0]
        for ref in re.findall(r'crate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)',text):
            parts=ref.split('::')
            # longest prefix that is a module
            for k in range(len(parts),0,-1):
                cand='::'.join(parts[:k])
                if cand in mods: break
            else: continue
            if cand!=m and not m.startswith(cand+'::') : g[m].add(cand)
        # super:: references
        for ref in re.findall(r'\bsuper::([a-z_][a-z0-9_]*)',text):
            parent='::'.join(m.split('::')[:-1]) or 'crate'
            cand=(parent+'::'+ref) if parent!='crate' else ref
            if cand in mods and cand!=m: g[m].add(cand)
            elif parent in mods and parent!=m and parent!='crate': g[m].add(parent)
    # tarjan
    index={};low={};st=[];on=set();res=[];i=[0]
    def sc(v):
        index[v]=low[v]=i[0];i[0]+=1;st.append(v);on.add(v)
        for w in g[v]:
            if w not in index: sc(w);low[v]=min(low[v],low[w])
            elif w in on: low[v]=min(low[v],index[w])
        if low[v]==index[v]:
            comp=[]
            while True:
                w=st.pop();on.discard(w);comp.append(w)
                if w==v: break
            if len(comp)>1: res.append(comp)
    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index: sc(v)
    # ignore cycles between a module and its own submodules (parent/child)
    real=[]
    for comp in res:
        if all(any(a.startswith(b+'::') or b.startswith(a+'::') for b in comp if b!=a) for a in comp) and len(comp)==2: 
            real.append(('parent-child',comp))
        else: real.append(('cycle',comp))
    for kind,comp in real:
        print(c, kind, sorted(comp)); total+=1
print('components with cycles:', total)
